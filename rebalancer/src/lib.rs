//! The online move engine (`mover`), the plans that propose moves (`plan`) and the shard-balance report
//! (`report`) behind the `rebalance` CLI.
#![forbid(unsafe_code)]

pub mod mover;
pub mod plan;
pub mod report;

pub(crate) use shardmap::sql::{quote_ident, quote_literal as quote_literal_sql};
