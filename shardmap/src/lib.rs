//! shardmap: the pure core of shard-router. It reads config.csv into a [`ShardMap`] and turns (SQL text,
//! Bind parameters, session state) into a routing [`Decision`]. Nothing here opens a socket.
//!
//! ```
//! use std::sync::Arc;
//! use shardmap::{Config, NoParams, Planner, Session, ShardMap, Target, ShardId};
//! let config = Config::parse("config.csv", b"shard-strategy,hash\nshard-count,4\nshard-key,user_id\n").unwrap();
//! let planner = Planner::new(Arc::new(ShardMap::new(&config).unwrap()));
//! let d = planner.decide("SELECT * FROM users WHERE user_id = 12345", &NoParams, &Session::default()).unwrap();
//! assert_eq!(d.target, Target::One(ShardId(1)));
//! ```
#![forbid(unsafe_code)]

pub mod catalog;
pub mod config;
pub mod decision;
pub mod geo;
pub mod hash;
mod lexical;
pub mod map;
pub mod planner;
pub mod shape;
pub mod sql;
pub mod value;

pub use config::{Config, ConfigError, Strategy};
pub use decision::{Decision, RouteError, Target};
pub use map::{BucketId, ShardId, ShardMap};
pub use planner::{LiteralParams, NoParams, Param, Params, Planner, Relation, Session, TextParams};
pub use value::{KeyType, KeyValue};
