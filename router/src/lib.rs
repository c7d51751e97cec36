//! shard-router: the PostgreSQL-wire proxy. A client's messages are read as frames, each statement is routed
//! by `shardmap`, and the frames are relayed as bytes to pooled server connections of the chosen shard.
#![forbid(unsafe_code)]

pub mod admin;
pub mod alltx;
pub mod backend;
pub mod breaker;
pub mod cancel;
pub mod catalog;
pub mod client;
pub mod copy;
pub mod demo;
pub mod extended;
pub mod fanout;
pub mod localpg;
pub mod observe;
pub mod pool;
pub mod proto;
pub mod server;
pub mod settings;
pub mod startup;
pub mod tenant;
pub mod topology;
pub mod wire;
