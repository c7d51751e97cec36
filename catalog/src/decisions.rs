//! The two-phase commit decision log (`gb_2pc`, see `shardmap::catalog::TWO_PHASE_SCHEMA`): a router records
//! its decision to commit a transaction prepared on several shards before the first `COMMIT PREPARED`, and a
//! recovery that finds a transaction prepared and undecided for too long records `abort` for it. Whichever
//! comes first stands (the transaction's id is the primary key), so that a slow router and another router's
//! recovery never decide differently.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use shardmap::catalog::TWO_PHASE_SCHEMA;
use shardmap::config::NodeAddr;
use tokio::sync::OnceCell;

/// Why a decision could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Nothing was recorded (no connection, or the server refused the statement).
    #[error("{0:#}")]
    NotRecorded(anyhow::Error),
    /// The statement was sent and no answer came: it may have been recorded.
    #[error("{0:#}")]
    Unknown(anyhow::Error),
}

/// A node address's hosts, in the order tried.
type Hosts = Vec<(String, u16)>;

/// The decision log's connections.
pub struct Decisions {
    /// Where it is (moved to a new primary by the router's topology).
    pub addr: crate::Place,
    /// The pool for the hosts it was made for; made again when the address changes.
    pool: std::sync::Mutex<Option<(Hosts, deadpool_postgres::Pool)>>,
    /// The table was made (once per process).
    made: OnceCell<()>,
}

impl Decisions {
    /// The log at `addr` (its database is created when missing, at first use). Connects lazily.
    pub fn new(addr: crate::Place) -> Decisions {
        Decisions { addr, pool: Default::default(), made: OnceCell::new() }
    }

    /// The pool for the address as it is now.
    fn pool(&self, addr: &NodeAddr) -> Result<deadpool_postgres::Pool> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((hosts, p)) = pool.as_ref() {
            if *hosts == addr.hosts {
                return Ok(p.clone());
            }
        }
        let (mut cfg, tls) = crate::pg_config(addr, None, "shard-router 2pc")?;
        cfg.connect_timeout(Duration::from_secs(3));
        let manager = deadpool_postgres::Manager::from_config(
            cfg,
            tls,
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast },
        );
        let p = deadpool_postgres::Pool::builder(manager)
            .max_size(16)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()
            .expect("a pool with a runtime and no hooks builds");
        // The old pool's connections close as their last users return them.
        *pool = Some((addr.hosts.clone(), p.clone()));
        Ok(p)
    }

    /// A connection, the database and table made first when missing.
    async fn client(&self) -> Result<deadpool_postgres::Object> {
        let addr = self.addr.get();
        self.made
            .get_or_try_init(|| async {
                let client = crate::connect_creating(&addr, "shard-router 2pc").await?;
                client.batch_execute(TWO_PHASE_SCHEMA).await.context("creating gb_2pc")?;
                anyhow::Ok(())
            })
            .await?;
        self.pool(&addr)?.get().await.with_context(|| format!("the 2PC decision log at {addr}"))
    }

    /// Records the decision to commit `txid` (prepared as `gids`) by `router`. `Ok(false)`: an abort was
    /// recorded first (by a recovery): the transaction must be rolled back.
    pub async fn commit(&self, txid: &str, router: &str, gids: &[String]) -> Result<bool, RecordError> {
        let client = self.client().await.map_err(RecordError::NotRecorded)?;
        let r = client
            .query_opt(
                "INSERT INTO gb_2pc (txid, outcome, router, gids) VALUES ($1, 'commit', $2, $3) \
                 ON CONFLICT (txid) DO NOTHING RETURNING 1",
                &[&txid, &router, &gids],
            )
            .await;
        match r {
            Ok(row) => Ok(row.is_some()),
            Err(e) if e.as_db_error().is_some() => Err(RecordError::NotRecorded(e.into())),
            Err(e) => Err(RecordError::Unknown(e.into())),
        }
    }

    /// Records an abort of `txid` unless a decision is there already; returns the decision that stands
    /// (`true`: commit).
    pub async fn abort(&self, txid: &str, router: &str) -> Result<bool> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO gb_2pc (txid, outcome, router) VALUES ($1, 'abort', $2) ON CONFLICT (txid) DO NOTHING",
                &[&txid, &router],
            )
            .await?;
        let row = client.query_one("SELECT outcome FROM gb_2pc WHERE txid = $1", &[&txid]).await?;
        Ok(row.get::<_, &str>(0) == "commit")
    }

    /// The decisions recorded for `txids` (`true`: commit).
    pub async fn outcomes(&self, txids: &[String]) -> Result<HashMap<String, bool>> {
        if txids.is_empty() {
            return Ok(HashMap::new());
        }
        let client = self.client().await?;
        let rows = client.query("SELECT txid, outcome FROM gb_2pc WHERE txid = ANY($1)", &[&txids]).await?;
        Ok(rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, &str>(1) == "commit")).collect())
    }

    /// Forgets the decisions of transactions committed everywhere.
    pub async fn forget(&self, txids: &[String]) -> Result<()> {
        let client = self.client().await?;
        client.execute("DELETE FROM gb_2pc WHERE txid = ANY($1) AND outcome = 'commit'", &[&txids]).await?;
        Ok(())
    }

    /// Deletes decisions no prepared transaction needs any more: commits older than `commits` whose
    /// transaction is prepared nowhere (`prepared`: the ids of every transaction still prepared on any node),
    /// aborts older than `aborts` (kept longer: a router that prepares slowly must still find its abort).
    pub async fn prune(&self, prepared: &[String], commits: Duration, aborts: Duration) -> Result<u64> {
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM gb_2pc WHERE txid <> ALL($1) AND ((outcome = 'commit' AND decided < now() - make_interval(secs => $2)) \
                 OR (outcome = 'abort' AND decided < now() - make_interval(secs => $3)))",
                &[&prepared, &commits.as_secs_f64(), &aborts.as_secs_f64()],
            )
            .await?;
        Ok(n)
    }
}
