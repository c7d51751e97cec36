//! shard-router: the PostgreSQL-wire proxy. A client's messages are read as frames, each statement is routed
//! by `shardmap`, and the frames are relayed as bytes to pooled server connections of the chosen shard.
//!
//! The modules read as the path of a statement, each layer using only those below it:
//! [`net`] (framing, protocol messages, the errors a client sees) → [`backend`] (server connections, pools,
//! checkout with failover and replicas, topology, breaker, tenant databases) → [`frontend`] (startup, auth,
//! the session and its transaction state machine; the simple and extended protocols, COPY and fan-out as
//! views of one dispatch) → [`control`] (catalog follower, admin console, HTTP observability, reload) →
//! [`server`] (the accept loop and the handles every client task shares).
#![forbid(unsafe_code)]

pub mod backend;
pub mod control;
pub mod demo;
pub mod explain;
pub mod frontend;
pub mod net;
pub mod server;
