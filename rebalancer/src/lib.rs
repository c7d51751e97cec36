//! The online move engine and the `rebalance` CLI (issue 6). Built so far: the shard-balance report
//! (`rebalance report`), which reads every node's tables and says how even the data is.
#![forbid(unsafe_code)]

pub mod mover;
pub mod plan;
pub mod report;
