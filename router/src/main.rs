//! `shard-router`: the command line. Thin: argument parsing, then a call into the library.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod explain;

/// A PostgreSQL sharding proxy: point a connection string at it and each statement goes to its shard.
#[derive(Parser)]
#[command(name = "shard-router", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print where a statement would go, as JSON, without connecting anywhere.
    ///
    /// Example: shard-router explain --config config.csv "SELECT * FROM users WHERE user_id = 12345"
    /// prints {"strategy":"hash","key":"user_id","values":["12345"],"shards":["1"],...}.
    /// Exit status: 0 routed, 1 refused (the JSON says why), 2 bad config or arguments.
    Explain {
        /// The config.csv to read.
        #[arg(long, short)]
        config: PathBuf,
        /// A Bind parameter value ($1, $2, ... in order), in text format; "NULL" for NULL.
        #[arg(long = "param", short = 'p', value_name = "VALUE")]
        params: Vec<String>,
        /// The tenant of the session (as if the client had run SET gb.tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// The database the client connected to (tenant strategy: <prefix><tenant>).
        #[arg(long)]
        database: Option<String>,
        /// The session's shard key (as if the client had run SET gb.shard_key).
        #[arg(long)]
        shard_key: Option<String>,
        /// The SQL statement (or several, separated by ';').
        sql: String,
    },
    /// Read a config.csv, report its errors, or print the settings it gives as JSON.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Explain { config, params, tenant, database, shard_key, sql } => {
            explain::run(&config, params, tenant, database, shard_key, &sql)
        }
        Command::Check { config } => explain::check(&config),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shard-router: {e:#}");
            ExitCode::from(2)
        }
    }
}
