//! The routing decision: a small value saying where a statement goes (one shard, a set, every shard, any
//! shard, or wherever the session is), with the key values and the reason, or an error saying why not.

use std::sync::Arc;

use serde_json::{json, Value as Json};

use crate::map::{BucketId, PlaceError, ShardId, ShardMap};
use crate::sql::Analysis;
use crate::value::{KeyValue, ParamError};

/// Where a statement goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    One(ShardId),
    /// Several shards (sorted, no duplicates): a read whose key names several shards.
    Set(Vec<ShardId>),
    /// Every shard: reads with no key (rows concatenated), DDL, writes to global tables, COPY to be split.
    All,
    /// Any one shard gives the same answer: no table, global tables, system catalogs.
    Any,
    /// Transaction control and session settings: wherever the session's transaction is.
    Session,
}

/// A routing decision.
#[derive(Clone, Debug)]
pub struct Decision {
    pub target: Target,
    /// The key values that decided it (after reading Bind parameters).
    pub values: Vec<KeyValue>,
    /// Under `hash-buckets`: each value's bucket.
    pub buckets: Vec<BucketId>,
    /// Under `geo`: each value's region (or "default").
    pub regions: Vec<Arc<str>>,
    /// Under `tenant`: the tenant's database.
    pub database: Option<String>,
    pub reason: std::sync::Arc<str>,
    /// The analysis it came from (COPY details, session changes).
    pub analysis: Arc<Analysis>,
}

/// Why a statement cannot be routed. Each maps to a SQLSTATE for the client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// A write to a sharded table with no key.
    #[error("{statement} needs the shard key {key} ({reason}); add a {key} condition, a /* shard_key: ... */ hint, or SET gb.shard_key")]
    MissingKey { statement: &'static str, key: String, reason: String },
    /// The statement can't be routed whatever its parameters.
    #[error("{0}")]
    Refused(String),
    /// A write or a multi-statement string whose parts go to different shards.
    #[error("{what} spans shards {shards}; cross-shard writes are not supported: send one statement per shard")]
    SpansShards { what: String, shards: String },
    #[error(transparent)]
    Place(#[from] PlaceError),
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error("the hint names shard {0:?}, which is not in the shard map")]
    UnknownShard(String),
    #[error("no tenant: connect to a database named {prefix}<tenant>, SET gb.tenant, or give the key {key}")]
    NoTenant { prefix: String, key: String },
    #[error("shard key {value:?}: {why}")]
    BadKey { value: String, why: String },
    /// `INSERT INTO table VALUES (...)` without a column list: the key's position in the table is needed
    /// (the router reads it from the server and decides again).
    #[error("the position of the shard key among the columns of {table} is not known")]
    KeyPosition { table: String },
    /// A read spanning shards names relations whose kind the session has not learnt: each may be a view, a
    /// sequence or a foreign table rather than a table (the router asks a shard and decides again; see
    /// `Session::relations`).
    #[error("what {} is on the servers is not known", names.join(", "))]
    Relations { names: Vec<String> },
}

impl RouteError {
    /// The SQLSTATE a client sees: 42P01-like "feature" errors are 0A000, missing input 42000.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            RouteError::MissingKey { .. } | RouteError::NoTenant { .. } => "42000",
            RouteError::SpansShards { .. } | RouteError::Refused(_) => "0A000",
            RouteError::Param(_) | RouteError::BadKey { .. } => "22023",
            RouteError::Place(_) | RouteError::UnknownShard(_) => "22023",
            RouteError::KeyPosition { .. } | RouteError::Relations { .. } => "0A000",
        }
    }
}

impl Target {
    fn label(&self) -> &'static str {
        match self {
            Target::One(_) => "one",
            Target::Set(_) => "set",
            Target::All => "all",
            Target::Any => "any",
            Target::Session => "session",
        }
    }
}

impl Decision {
    /// The shards this decision names (every shard for `All`, none for `Any` and `Session`).
    pub fn shards(&self, map: &ShardMap) -> Vec<ShardId> {
        match &self.target {
            Target::One(s) => vec![*s],
            Target::Set(s) => s.clone(),
            Target::All => map.all().collect(),
            Target::Any | Target::Session => Vec::new(),
        }
    }

    /// The decision as `explain` prints it.
    pub fn to_json(&self, map: &ShardMap) -> Json {
        let names: Vec<&str> = self.shards(map).iter().map(|s| map.node(*s).name.as_str()).collect();
        // The key column of the first sharded table the statement names (`shard-table-<table>` or `shard-key`).
        let key = self
            .analysis
            .statements
            .iter()
            .find_map(|s| match &s.tables {
                crate::sql::Tables::Sharded(t) => Some(map.key_of(t)),
                _ => None,
            })
            .unwrap_or(&map.key);
        let mut j = json!({
            "strategy": map.strategy,
            "key": key,
            "values": self.values.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
            "shards": names,
            "target": self.target.label(),
            "reason": &*self.reason,
        });
        let o = j.as_object_mut().expect("object");
        match self.buckets.as_slice() {
            [] => {}
            [b] => {
                o.insert("bucket".into(), json!(b.0));
            }
            many => {
                o.insert("buckets".into(), json!(many.iter().map(|b| b.0).collect::<Vec<_>>()));
            }
        }
        match self.regions.as_slice() {
            [] => {}
            [r] => {
                o.insert("region".into(), json!(&**r));
            }
            many => {
                o.insert("regions".into(), json!(many.iter().map(|r| &**r).collect::<Vec<_>>()));
            }
        }
        if let Some(db) = &self.database {
            o.insert("database".into(), json!(db));
        }
        j
    }
}

impl RouteError {
    /// The error as `explain` prints it.
    pub fn to_json(&self, map: &ShardMap) -> Json {
        json!({
            "strategy": map.strategy,
            "key": map.key,
            "shards": [],
            "target": "refused",
            "error": self.to_string(),
            "sqlstate": self.sqlstate(),
        })
    }
}
