//! The online move engine (`mover`), the plans that propose moves (`plan`) and the shard-balance report
//! (`report`) behind the `rebalance` CLI.
#![forbid(unsafe_code)]

pub mod mover;
pub mod plan;
pub mod report;

/// An SQL identifier, quoted.
pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// An SQL string literal (standard_conforming_strings), quoted.
pub(crate) fn quote_literal_sql(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
