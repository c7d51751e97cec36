//! Diesel through shard-router: see tests/botserver.rs.
