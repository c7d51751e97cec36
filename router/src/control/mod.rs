//! Control: the admin console ([`admin`]) and HTTP observability ([`observe`]); the catalog follower is
//! `shard_catalog::follow`, started by [`crate::server::run`].

pub mod admin;
pub mod observe;
pub mod reload;
