//! Benchmarks of shard-router: see the README in this folder.
