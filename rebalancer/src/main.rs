//! `rebalance`: the command line of the rebalancer. Built so far: `report`, the shard-balance report.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Moves data between shard-router's shards and reports how even they are.
///
/// Exit status: 0 done, 1 a node or a router could not be read, 2 bad config or arguments.
#[derive(Parser)]
#[command(name = "rebalance", version, about, long_about = None)]
struct Cli {
    /// The config.csv that names the shards (the router's).
    #[arg(long, short, global = true, default_value = "config.csv")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Csv,
    Json,
    Html,
}

#[derive(Subcommand)]
enum Command {
    /// The shard-balance report: rows and bytes per node and per table, the largest units (buckets under
    /// hash-buckets, tenant databases under tenant), and skew (max/mean, coefficient of variation).
    ///
    /// Reads every table once (exact row counts). Example:
    /// rebalance --config config.csv report --format html --out balance.html
    Report {
        /// table (for a terminal), csv, json, or html (one self-contained page with SVG bar charts).
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// How many of the largest units to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// A router's metrics URL (`router-http` + /metrics), once per router: adds statements per second
        /// and p99 latency per node.
        #[arg(long = "metrics", value_name = "URL")]
        metrics: Vec<String>,
        /// How long to sample the routers' counters for statements per second.
        #[arg(long, default_value_t = 2000)]
        sample_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match shardmap::Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rebalance: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Report { format, out, top, metrics, sample_ms } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
            let sample = std::time::Duration::from_millis(sample_ms);
            let report = match rt.block_on(rebalancer::report::gather_with(&config, top, &metrics, sample)) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("rebalance report: {e:#}");
                    return ExitCode::from(1);
                }
            };
            let text = match format {
                Format::Table => rebalancer::report::to_table(&report),
                Format::Csv => rebalancer::report::to_csv(&report),
                Format::Json => serde_json::to_string_pretty(&report).expect("a report serializes") + "\n",
                Format::Html => rebalancer::report::to_html(&report),
            };
            match out {
                Some(path) => {
                    if let Err(e) = std::fs::write(&path, text) {
                        eprintln!("rebalance report: {}: {e}", path.display());
                        return ExitCode::from(2);
                    }
                }
                None => print!("{text}"),
            }
            ExitCode::SUCCESS
        }
    }
}
