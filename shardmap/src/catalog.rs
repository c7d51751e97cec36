//! The catalog's shape: where it is, its tables, and the units it places. The live shard map — which node
//! owns each hash bucket, and which units are frozen by a move — is kept in a PostgreSQL database so that
//! every router and the rebalancer share it. This module only names things (SQL text, unit names); the
//! router (`router/src/catalog.rs`) and the rebalancer do the I/O.

use std::fmt;
use std::str::FromStr;

use crate::config::{parse_addr, Algorithm, Config, NodeAddr, Strategy};

/// The catalog's database when `shard-catalog` is not set: on the first node.
pub const DEFAULT_DATABASE: &str = "gb_shard_catalog";

/// The NOTIFY channel on which every change of the catalog is announced (payload: the new version).
pub const CHANNEL: &str = "gb_shard_catalog";

/// The key of the advisory lock that serializes schema creation and seeding (transaction-level).
pub const SEED_LOCK: i64 = 0x0067_625f_7365_6564; // "gb_seed"

/// The key of the advisory lock a rebalancer holds for its whole run (session-level): one at a time.
pub const REBALANCER_LOCK: i64 = 0x6762_5f72_6562_616c; // "gb_rebal"

/// The catalog's tables. `gb_catalog` has one row: the map's version, raised by every change.
/// `gb_units`: each unit's owner node, and whether a move froze it. `gb_routers`: the routers that follow
/// the catalog, with the version each has applied and its last heartbeat. `gb_moves`: every move and the
/// step it reached (its state machine, so that a crashed rebalancer resumes); `gb_move_identity`: the
/// tables a move set to `REPLICA IDENTITY FULL`, to restore.
pub const SCHEMA: &str = "\
CREATE TABLE IF NOT EXISTS gb_catalog (
    version bigint NOT NULL,
    seeded timestamptz NOT NULL DEFAULT now(),
    strategy text NOT NULL,
    buckets int
);
CREATE TABLE IF NOT EXISTS gb_units (
    unit text PRIMARY KEY,
    node text NOT NULL,
    frozen boolean NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS gb_routers (
    id text PRIMARY KEY,
    addr text NOT NULL DEFAULT '',
    version bigint NOT NULL DEFAULT 0,
    started timestamptz NOT NULL DEFAULT now(),
    seen timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS gb_moves (
    id bigserial PRIMARY KEY,
    unit text NOT NULL,
    source text NOT NULL,
    target text NOT NULL,
    state text NOT NULL,
    started timestamptz NOT NULL DEFAULT now(),
    updated timestamptz NOT NULL DEFAULT now(),
    finished timestamptz,
    freeze_ms bigint,
    rows_moved bigint,
    error text
);
CREATE TABLE IF NOT EXISTS gb_move_identity (
    move bigint NOT NULL,
    table_name text NOT NULL,
    PRIMARY KEY (move, table_name)
);
ALTER TABLE gb_moves ADD COLUMN IF NOT EXISTS created_target boolean NOT NULL DEFAULT false;
CREATE UNIQUE INDEX IF NOT EXISTS gb_moves_one_active ON gb_moves ((true)) WHERE finished IS NULL;
";

/// The two-phase commit decision log, in the catalog database (created there by the first router that
/// commits across shards, with or without a shard map kept there): one row per transaction prepared on several
/// shards, written before the first `COMMIT PREPARED` (`commit`), or by a recovery that found it prepared and
/// undecided for too long (`abort`). The primary key is the arbiter: the first decision stands.
pub const TWO_PHASE_SCHEMA: &str = "\
CREATE TABLE IF NOT EXISTS gb_2pc (
    txid text PRIMARY KEY,
    outcome text NOT NULL CHECK (outcome IN ('commit', 'abort')),
    router text NOT NULL,
    gids text[] NOT NULL DEFAULT '{}',
    decided timestamptz NOT NULL DEFAULT now()
);
";

/// The prefix of the names of transactions the router prepares: `gb_2pc_<router tag>_<number>_<shard>`
/// (the transaction's id is the name up to the last `_`).
pub const TWO_PHASE_PREFIX: &str = "gb_2pc_";

/// Where the decision log is: the catalog's database, else `gb_shard_catalog` on the first node.
pub fn decisions_address(c: &Config) -> Result<Option<NodeAddr>, String> {
    if let Some(a) = address(c)? {
        return Ok(Some(a));
    }
    Ok(first_node(c).map(|(_, a)| NodeAddr { dbname: Some(DEFAULT_DATABASE.into()), ..a.clone() }))
}

/// The node named `0`, else the first one: where the catalog and the decision log are when `shard-catalog`
/// does not say.
fn first_node(c: &Config) -> Option<&(String, NodeAddr)> {
    c.nodes.iter().find(|(n, _)| n == "0").or(c.nodes.first()).or(c.geo_regions.first())
}

/// The node whose server holds the catalog and the decision log when `shard-catalog` does not name one: they
/// follow that node's primary through a failover. `None` when `shard-catalog` is set (its URL says where).
pub fn home_node(c: &Config) -> Option<&str> {
    match c.catalog {
        Some(_) => None,
        None => first_node(c).map(|(n, _)| n.as_str()),
    }
}

/// How long a router may go without a heartbeat and still count as live (a cutover waits for every live
/// router's acknowledgement; one silent longer is taken for gone, and the source's guard stops its writes).
pub const ROUTER_LIVE_S: u32 = 3;

/// A unit of data that moves as a whole.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    /// `bucket:17`: a hash bucket under `shard-algorithm,hash-buckets`.
    Bucket(u32),
    /// `tenant:acme`: a tenant's database.
    Tenant(String),
    /// `range:shard2@1500000`: the part of `shard2`'s range from 1500000 up.
    Range { node: String, from: i64 },
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unit::Bucket(b) => write!(f, "bucket:{b}"),
            Unit::Tenant(t) => write!(f, "tenant:{t}"),
            Unit::Range { node, from } => write!(f, "range:{node}@{from}"),
        }
    }
}

impl FromStr for Unit {
    type Err = String;

    fn from_str(s: &str) -> Result<Unit, String> {
        let expected = "expected bucket:N, tenant:NAME or range:NODE@START";
        let (kind, rest) = s.split_once(':').ok_or_else(|| format!("{s:?}: {expected}"))?;
        match kind {
            "bucket" => rest.parse().map(Unit::Bucket).map_err(|_| format!("{s:?}: the bucket is not a number")),
            "tenant" if !rest.is_empty() => Ok(Unit::Tenant(rest.to_string())),
            "range" => {
                let (node, from) = rest.split_once('@').ok_or_else(|| format!("{s:?}: {expected}"))?;
                let from = from.parse().map_err(|_| format!("{s:?}: the split point is not an integer"))?;
                Ok(Unit::Range { node: node.to_string(), from })
            }
            _ => Err(format!("{s:?}: {expected}")),
        }
    }
}

/// Where the catalog is: `shard-catalog`, or the database `gb_shard_catalog` on the first node. `None`
/// when there is nothing a catalog would place (`shard-catalog,off`, or a strategy whose units do not move
/// yet: hash buckets, tenants and range pieces do).
pub fn address(c: &Config) -> Result<Option<NodeAddr>, String> {
    match c.catalog.as_deref() {
        Some("off") => Ok(None),
        Some(url) => parse_addr(url).map(Some),
        None if (c.strategy == Strategy::Hash && c.algorithm == Algorithm::HashBuckets)
            || matches!(c.strategy, Strategy::Tenant | Strategy::Range) =>
        {
            let first = c.nodes.iter().find(|(n, _)| n == "0").or(c.nodes.first());
            Ok(first.map(|(_, a)| NodeAddr { dbname: Some(DEFAULT_DATABASE.into()), ..a.clone() }))
        }
        None => Ok(None),
    }
}

/// The SQL condition that holds for the rows of `unit` in a table sharded on `key` (of `key_type`), for
/// `buckets` buckets: the same hash the router computes (every row of a tenant's database).
pub fn unit_condition(unit: &Unit, key: &str, key_type: crate::KeyType, buckets: u32) -> String {
    match unit {
        Unit::Bucket(b) => format!("{} = {b}", crate::hash::sql_slot_expr(key, key_type, buckets)),
        Unit::Range { from, .. } => format!("{key} >= {from}"),
        Unit::Tenant(_) => "true".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_read_back() {
        for s in ["bucket:17", "tenant:acme", "range:shard2@1500000", "range:a@-5"] {
            assert_eq!(s.parse::<Unit>().unwrap().to_string(), s);
        }
        for bad in ["bucket", "bucket:x", "tenant:", "range:shard2", "range:s@x", "cube:1"] {
            assert!(bad.parse::<Unit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn default_catalog_is_on_the_first_node() {
        let c = Config::parse(
            "config.csv",
            b"shard-strategy,hash\nshard-count,2\nshard-key,id\nshard-algorithm,hash-buckets\n\
              shard-node-0,postgres://u@h0:5432/app\nshard-node-1,postgres://u@h1:5432/app\n",
        )
        .unwrap();
        let a = address(&c).unwrap().unwrap();
        assert_eq!(a.hosts, vec![("h0".to_string(), 5432)]);
        assert_eq!(a.dbname.as_deref(), Some(DEFAULT_DATABASE));
        let off = Config::parse("config.csv", b"shard-strategy,hash\nshard-count,2\nshard-key,id\n").unwrap();
        assert!(address(&off).unwrap().is_none(), "modulo: nothing moves");
    }
}
