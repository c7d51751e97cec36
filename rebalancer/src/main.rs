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
    /// Prometheus' text exposition format (gauges named shard_balance_*).
    Prom,
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
    /// Proposes moves (a dry run): even out rows, bytes or load over the nodes within --threshold, or fill
    /// a node up to the mean (--fill), or move every bucket off one (--drain). Writes the plan file that
    /// `apply` carries out.
    ///
    /// Example: rebalance --config config.csv plan --by bytes --out plan.json && rebalance apply plan.json
    Plan {
        /// rows, bytes (of the rows' data; of the databases, for tenants), or load (statements per second
        /// from --metrics, shared out to a node's units by their rows, or bytes for tenants). Default: rows
        /// for buckets, bytes for tenants (their rows are not counted).
        #[arg(long, value_enum)]
        by: Option<rebalancer::plan::By>,
        /// Bring this node (a new one, or a light one) up to the mean.
        #[arg(long, value_name = "NODE", conflicts_with = "drain")]
        fill: Option<String>,
        /// Move every bucket off this node (to the lightest others), empty ones included.
        #[arg(long, value_name = "NODE")]
        drain: Option<String>,
        /// How far above the mean a node may stay (0.1: 10%).
        #[arg(long, default_value_t = 0.1)]
        threshold: f64,
        /// Where to write the plan.
        #[arg(long, default_value = "rebalance-plan.json")]
        out: PathBuf,
        /// A router's metrics URL, once per router (needed by --by load).
        #[arg(long = "metrics", value_name = "URL")]
        metrics: Vec<String>,
        /// Print the plan as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Carries out a plan file, one move after the other; moves already done are skipped, so it can be run
    /// again after a failure.
    Apply {
        /// The plan file written by `plan`.
        plan: PathBuf,
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
    /// Counts a unit's rows on every node and names its owner; exit status 1 if rows of it are on a node
    /// that does not own it.
    Verify {
        /// The unit: bucket:N, tenant:NAME or range:NODE@START.
        unit: String,
        #[arg(long)]
        json: bool,
    },
    /// The shard-balance report: rows and bytes per node and per table, the largest units (buckets under
    /// hash-buckets, tenant databases under tenant), and skew (max/mean, coefficient of variation).
    ///
    /// Reads every table once (exact row counts). Example:
    /// rebalance --config config.csv report --format html --out balance.html
    ///
    /// --format prom prints the figures as Prometheus text (gauges shard_balance_node_rows/_bytes{node},
    /// shard_balance_table_rows/_bytes{node,table,sharded}, shard_balance_skew_ratio/_cv{by="rows"|"bytes"},
    /// shard_balance_table_skew_ratio/_cv{table}, shard_balance_unit_rows/_bytes{unit,node},
    /// shard_balance_planned_moves, shard_balance_report_timestamp_seconds), for node_exporter's textfile
    /// collector, e.g. from cron:
    /// rebalance --config config.csv report --format prom --out /var/lib/node_exporter/textfile/shard_balance.prom
    Report {
        /// table (for a terminal), csv, json, html (one self-contained page with SVG bar charts), or prom
        /// (Prometheus text exposition format: gauges named shard_balance_*).
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
            moving(rt(), config, json, false, |mut r| async move { r.start(&unit, &to).await.map(|o| (r, o)) })
        }
        Command::Resume { json } => {
            moving(rt(), config, json, true, |mut r| async move { r.resume().await.map(|o| (r, o)) })
        }
        Command::Abort { json } => {
            moving(rt(), config, json, true, |mut r| async move { r.abort().await.map(|o| (r, o)) })
        }
        Command::Plan { by, fill, drain, threshold, out, metrics, json } => {
            let goal = match (fill, drain) {
                (Some(n), _) => rebalancer::plan::Goal::Fill(n),
                (_, Some(n)) => rebalancer::plan::Goal::Drain(n),
                _ => rebalancer::plan::Goal::Even,
            };
            let tenants = config.strategy == shardmap::Strategy::Tenant;
            let by = by.unwrap_or(if tenants { rebalancer::plan::By::Bytes } else { rebalancer::plan::By::Rows });
            if tenants && by == rebalancer::plan::By::Rows {
                eprintln!("rebalance plan: tenants are planned by bytes (their databases' sizes) or load, not rows");
                return ExitCode::from(2);
            }
            if by == rebalancer::plan::By::Load && metrics.is_empty() {
                eprintln!("rebalance plan: --by load needs the routers' --metrics URLs");
                return ExitCode::from(2);
            }
            let nodes: Vec<String> = config.nodes.iter().map(|(n, _)| n.clone()).collect();
            let r = rt().block_on(async {
                let sizes = rebalancer::plan::unit_sizes(&config).await?;
                let load = if metrics.is_empty() {
                    Default::default()
                } else {
                    rebalancer::report::router_figures(&metrics, std::time::Duration::from_secs(2))
                        .await?
                        .into_iter()
                        .map(|(n, (qps, _))| (n, qps))
                        .collect()
                };
                rebalancer::plan::propose(&sizes, &nodes, by, &goal, threshold, &load)
            });
            let plan = match r {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("rebalance plan: {e:#}");
                    return ExitCode::from(1);
                }
            };
            let text = serde_json::to_string_pretty(&plan).expect("a plan serializes") + "\n";
            if let Err(e) = std::fs::write(&out, &text) {
                eprintln!("rebalance plan: {}: {e}", out.display());
                return ExitCode::from(2);
            }
            if json {
                print!("{text}");
            } else {
                print!("{}", rebalancer::plan::to_text(&plan));
                println!("written to {}; `rebalance apply {}` carries it out", out.display(), out.display());
            }
            ExitCode::SUCCESS
        }
        Command::Apply { plan, json } => {
            let parsed: rebalancer::plan::Plan = match std::fs::read(&plan)
                .map_err(anyhow::Error::from)
                .and_then(|b| serde_json::from_slice(&b).map_err(anyhow::Error::from))
            {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("rebalance apply: {}: {e}", plan.display());
                    return ExitCode::from(2);
                }
            };
            let progress: Box<dyn rebalancer::mover::Progress> =
                if json { Box::new(rebalancer::mover::Quiet) } else { Box::new(rebalancer::mover::Bars::new()) };
            let r = rt().block_on(async {
                let mut r = rebalancer::mover::Rebalancer::open(config, progress).await?;
                r.apply(&parsed).await
            });
            match r {
                Ok(outcomes) if json => {
                    println!("{}", serde_json::to_string_pretty(&outcomes).expect("outcomes serialize"));
                    ExitCode::SUCCESS
                }
                Ok(outcomes) => {
                    for o in outcomes {
                        println!(
                            "{} {} -> {}: {}{}",
                            o.unit,
                            o.source,
                            o.target,
                            o.state,
                            o.freeze_ms.map(|f| format!(", {} rows, frozen {f} ms", o.rows)).unwrap_or_default()
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("rebalance apply: {e:#}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
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
        Command::Verify { unit, json } => {
            let r = rt().block_on(async {
                let r = rebalancer::mover::Rebalancer::reader(config).await?;
                r.verify(&unit).await
            });
            match r {
                Ok(v) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
                    } else {
                        print!("{}", v.to_text());
                    }
                    if v.clean() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
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
                Format::Prom => rebalancer::report::to_prom(&report),
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

/// Runs a move command (move, resume, abort) and prints its outcome. `after_crash` (resume, abort): the
/// one-rebalancer lock may still be a killed rebalancer's for a moment (see `Rebalancer::recovering`).
fn moving<F, Fut>(
    rt: tokio::runtime::Runtime,
    config: shardmap::Config,
    json: bool,
    after_crash: bool,
    run: F,
) -> ExitCode
where
    F: FnOnce(rebalancer::mover::Rebalancer) -> Fut,
    Fut: std::future::Future<
        Output = Result<(rebalancer::mover::Rebalancer, rebalancer::mover::Outcome), rebalancer::mover::MoveError>,
    >,
{
    let progress: Box<dyn rebalancer::mover::Progress> =
        if json { Box::new(rebalancer::mover::Quiet) } else { Box::new(rebalancer::mover::Bars::new()) };
    let r = rt.block_on(async {
        let r = if after_crash {
            rebalancer::mover::Rebalancer::recovering(config, progress).await?
        } else {
            rebalancer::mover::Rebalancer::open(config, progress).await?
        };
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
