//! shardmap: the pure core of shard-router. It reads config.csv into a [`ShardMap`] and turns (SQL text,
//! Bind parameters, session state) into a routing [`Decision`]. Nothing here opens a socket.
pub mod config;
pub mod geo;
pub mod hash;
pub mod sql;
pub mod value;
