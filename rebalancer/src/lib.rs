//! The online move engine and the `rebalance` CLI (issue 6). Nothing is built here yet: this crate holds the
//! place in the workspace so that its layout is the one the project keeps.
