//! Ids that cannot collide across shards: the sequences a `CREATE TABLE` (or `ALTER TABLE`) of a sharded
//! table makes for `serial`, `bigserial` and identity columns are interleaved once the statement ran — on
//! shard `i` of `n`, `INCREMENT BY n START WITH i + 1` — so that shard 0 hands out 1, n+1, 2n+1..., shard 1
//! hands out 2, n+2... Only sequences with the default start and increment (1 and 1) that have handed out no
//! value yet change: what a user set, or a sequence already in use, is left as it is. It runs between the
//! client's exchanges, inside the client's transaction where the statement ran in one (its DDL is on every
//! shard), else on a connection to each shard.

use super::session::Session;
use super::txn::Dest;
use crate::net::proto::READY_FAILED;
use crate::net::wire::Stream;

/// The statement that interleaves `table`'s fresh sequences on shard `index` of `count` (nothing when the
/// table does not exist; never an error, which would abort the client's transaction: a failure is caught in
/// its own subtransaction).
pub fn interleave_sql(table: &str, index: usize, count: usize) -> String {
    let table = shardmap::sql::quote_literal(table);
    format!(
        "DO $gb$ DECLARE r record; BEGIN \
           FOR r IN SELECT d.objid::regclass AS seq FROM pg_catalog.pg_depend d \
             JOIN pg_catalog.pg_sequence s ON s.seqrelid = d.objid \
             WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.refclassid = 'pg_catalog.pg_class'::regclass \
               AND d.refobjid = pg_catalog.to_regclass({table}) AND d.deptype IN ('a', 'i') \
               AND s.seqincrement = 1 AND s.seqstart = 1 \
           LOOP \
             IF pg_catalog.pg_sequence_last_value(r.seq) IS NULL THEN \
               EXECUTE pg_catalog.format('ALTER SEQUENCE %s INCREMENT BY {count} START WITH {start} RESTART WITH {start}', r.seq); \
             END IF; \
           END LOOP; \
         EXCEPTION WHEN OTHERS THEN \
           RAISE WARNING 'shard-router: the sequences of % were not interleaved: %', {table}, SQLERRM; \
         END $gb$",
        start = index + 1
    )
}

impl<S: Stream> Session<S> {
    /// Interleaves the sequences of the tables created or altered since the last exchange (see the module
    /// doc). Failures are logged: the statement that made the table has been answered already.
    pub async fn interleave_sequences(&mut self) {
        let tables = std::mem::take(&mut self.new_sequences);
        let count = self.routing.map.nodes.len();
        if count < 2 {
            return;
        }
        let in_txn = self.txn.on_shards();
        let dests: Vec<Dest> = if in_txn {
            self.txn.parts().to_vec()
        } else if self.txn.open() {
            // (Held: the statement did not open the transaction anywhere, so it did not run.)
            return;
        } else {
            self.routing.map.all().map(|shard| Dest { shard, db: None }).collect()
        };
        for dest in dests {
            let i = if in_txn {
                match self.links.find(&dest) {
                    Some(i) if self.links.get(i).status() != READY_FAILED => i,
                    _ => continue,
                }
            } else {
                match self.link(&dest).await {
                    Ok(i) => i,
                    Err(e) => {
                        tracing::warn!(shard = dest.shard.0, "interleaving sequences: {}", e.message);
                        continue;
                    }
                }
            };
            for t in &tables {
                let sql = interleave_sql(t, dest.shard.0 as usize, count);
                if let Err(e) = self.links.get(i).conn.conn().run_quiet(&sql).await {
                    tracing::warn!(shard = dest.shard.0, table = %t, "interleaving sequences: {e}");
                }
            }
        }
        self.release();
    }
}
