//! `rebalance`: the command line of the rebalancer: online moves of hash buckets (`move`, `status`,
//! `resume`, `abort`, `verify`) and the shard-balance report (`report`).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Moves data between shard-router's shards while clients keep writing, and reports how even they are.
///
/// Exit status: 0 done; 1 failed (a move rolled back, or a node, router or the catalog could not be
/// reached); 2 bad config, arguments or request; 3 busy (another rebalancer runs, a move is unfinished, or
/// there is none to resume or abort).
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
    /// Moves one unit to another node, online: copy and stream its rows (logical replication), catch up,
    /// freeze it in every router for a moment, verify, flip its owner, clean up.
    ///
    /// Example: rebalance --config config.csv move bucket:17 --to 2
    Move {
        /// The unit: bucket:N (under shard-algorithm,hash-buckets).
        unit: String,
        /// The node that will own it (a shard-node-<name>).
        #[arg(long)]
        to: String,
        /// Print the outcome as JSON (and no progress bars).
        #[arg(long)]
        json: bool,
    },
    /// The catalog: its version, frozen and moved units, routers and their heartbeats, moves.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Carries on the unfinished move (after the rebalancer was stopped or crashed) from its recorded step.
    Resume {
        #[arg(long)]
        json: bool,
    },
    /// Rolls back the unfinished move (if its unit has not flipped yet): the old owner keeps serving, the
    /// target's copy, the subscription, publication and replication slot are dropped.
    Abort {
        #[arg(long)]
        json: bool,
    },
    /// Counts a unit's rows on every node and names its owner.
    Verify {
        /// The unit: bucket:N.
        unit: String,
    },
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
    let rt = || tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    match cli.command {
        Command::Move { unit, to, json } => {
            moving(rt(), config, json, |mut r| async move { r.start(&unit, &to).await.map(|o| (r, o)) })
        }
        Command::Resume { json } => moving(rt(), config, json, |mut r| async move { r.resume().await.map(|o| (r, o)) }),
        Command::Abort { json } => moving(rt(), config, json, |mut r| async move { r.abort().await.map(|o| (r, o)) }),
        Command::Status { json } => match rt().block_on(rebalancer::mover::status(&config)) {
            Ok(s) if json => {
                println!("{}", serde_json::to_string_pretty(&s).expect("status serializes"));
                ExitCode::SUCCESS
            }
            Ok(s) => {
                print!("{}", rebalancer::mover::status_text(&s));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("rebalance status: {e:#}");
                ExitCode::from(e.exit_code())
            }
        },
        Command::Verify { unit } => {
            let r = rt().block_on(async {
                let r = rebalancer::mover::Rebalancer::open(config, Box::new(rebalancer::mover::Quiet)).await?;
                r.verify(&unit).await
            });
            match r {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("rebalance verify: {e:#}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Report { format, out, top, metrics, sample_ms } => {
            let rt = rt();
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

/// Runs a move command (move, resume, abort) and prints its outcome.
fn moving<F, Fut>(rt: tokio::runtime::Runtime, config: shardmap::Config, json: bool, run: F) -> ExitCode
where
    F: FnOnce(rebalancer::mover::Rebalancer) -> Fut,
    Fut: std::future::Future<
        Output = Result<(rebalancer::mover::Rebalancer, rebalancer::mover::Outcome), rebalancer::mover::MoveError>,
    >,
{
    let progress: Box<dyn rebalancer::mover::Progress> =
        if json { Box::new(rebalancer::mover::Quiet) } else { Box::new(rebalancer::mover::Bars::new()) };
    let r = rt.block_on(async {
        let r = rebalancer::mover::Rebalancer::open(config, progress).await?;
        run(r).await
    });
    match r {
        Ok((_, o)) if json => {
            println!("{}", serde_json::to_string_pretty(&o).expect("an outcome serializes"));
            ExitCode::SUCCESS
        }
        Ok((_, o)) => {
            println!(
                "move {}: {} {} -> {}: {}, {} rows{}, {:.1} s",
                o.id,
                o.unit,
                o.source,
                o.target,
                o.state,
                o.rows,
                o.freeze_ms.map(|f| format!(", frozen {f} ms")).unwrap_or_default(),
                o.seconds
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({ "error": format!("{e:#}"), "exit": e.exit_code() }));
            }
            eprintln!("rebalance: {e:#}");
            ExitCode::from(e.exit_code())
        }
    }
}
