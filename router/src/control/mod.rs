//! Control: the admin console ([`admin`]), HTTP observability ([`observe`]) and the recovery of transactions
//! left prepared by two-phase commit ([`recovery`]); the catalog follower is `shard_catalog::follow`, started
//! by [`crate::server::run`].

pub mod admin;
pub mod observe;
pub mod recovery;
pub mod reload;
