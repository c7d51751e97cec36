//! The shard-balance report: per node and per table, rows and bytes (`pg_total_relation_size`); per unit
//! (hash buckets under `hash-buckets`, tenant databases under `tenant`) the largest ones; and skew figures
//! (max/mean and the coefficient of variation of rows over the nodes) for each sharded table and for the
//! nodes' totals. Rows are exact (`count(*)`), so the report reads every table once.

use crate::quote_ident;
use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde::Serialize;
use shardmap::config::NodeAddr;
use shardmap::{Config, Strategy};

/// One table on one node.
#[derive(Serialize, Clone, Debug)]
pub struct TableFigures {
    pub node: String,
    pub table: String,
    pub rows: i64,
    pub bytes: i64,
    /// Whether the table has the shard key (sharded) rather than being a global or local table.
    pub sharded: bool,
}

/// A node's totals.
#[derive(Serialize, Clone, Debug)]
pub struct NodeFigures {
    pub node: String,
    /// Rows of sharded tables.
    pub rows: i64,
    /// Bytes of all tables.
    pub bytes: i64,
    /// Statements per second the routers sent it during the sample (with `--metrics`).
    pub statements_per_s: Option<f64>,
    /// The 99th percentile of its statements' latency in ms, from the routers' histograms since they
    /// started (the upper bound of the bucket that holds it).
    pub p99_ms: Option<f64>,
}

/// What one scrape of a router's `/metrics` says, per shard.
#[derive(Default, Clone, Debug)]
pub struct Scrape {
    /// shard → statements answered.
    pub queries: std::collections::BTreeMap<String, f64>,
    /// shard → (upper bound in seconds, cumulative count), in the order given.
    pub buckets: std::collections::BTreeMap<String, Vec<(f64, f64)>>,
}

/// Parses Prometheus text from shard-router's `/metrics`.
pub fn parse_metrics(text: &str) -> Scrape {
    let mut s = Scrape::default();
    let label = |series: &str, name: &str| -> Option<String> {
        let start = series.find(&format!("{name}=\""))? + name.len() + 2;
        let end = series[start..].find('"')? + start;
        Some(series[start..end].to_string())
    };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(v) = value.parse::<f64>() else { continue };
        if series.starts_with("shard_router_queries_total{") {
            if let Some(shard) = label(series, "shard") {
                s.queries.insert(shard, v);
            }
        } else if series.starts_with("shard_router_query_duration_seconds_bucket{") {
            if let (Some(shard), Some(le)) = (label(series, "shard"), label(series, "le")) {
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
                s.buckets.entry(shard).or_default().push((le, v));
            }
        }
    }
    s
}

/// The upper bound (seconds) of the bucket holding the q-quantile of a cumulative histogram.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets.iter().find(|(_, c)| *c >= total * q).map(|(le, _)| *le)
}

/// Scrapes every router twice, `sample` apart: statements per second and p99 per shard.
pub async fn router_figures(
    urls: &[String],
    sample: std::time::Duration,
) -> Result<std::collections::BTreeMap<String, (f64, Option<f64>)>> {
    let http = crate::http_client(None, std::time::Duration::from_secs(30))?;
    let scrape_all = || async {
        let mut all = Vec::new();
        for url in urls {
            let text = http
                .get(url)
                .timeout(std::time::Duration::from_secs(10))
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .with_context(|| format!("router metrics {url}"))?
                .text()
                .await?;
            all.push(parse_metrics(&text));
        }
        anyhow::Ok(all)
    };
    let first = scrape_all().await?;
    let t = std::time::Instant::now();
    tokio::time::sleep(sample).await;
    let second = scrape_all().await?;
    let secs = t.elapsed().as_secs_f64().max(1e-3);
    let mut out: std::collections::BTreeMap<String, (f64, Option<f64>)> = Default::default();
    for (a, b) in first.iter().zip(&second) {
        for (shard, q) in &b.queries {
            let before = a.queries.get(shard).copied().unwrap_or(0.0);
            out.entry(shard.clone()).or_insert((0.0, None)).0 += (q - before).max(0.0) / secs;
        }
    }
    // p99 over all routers: their histograms summed bucket by bucket.
    let shards: Vec<String> = out.keys().cloned().collect();
    for shard in shards {
        let mut summed: Vec<(f64, f64)> = Vec::new();
        for s in &second {
            for (i, (le, c)) in s.buckets.get(&shard).into_iter().flatten().enumerate() {
                match summed.get_mut(i) {
                    Some(x) => x.1 += c,
                    None => summed.push((*le, *c)),
                }
            }
        }
        if let Some(e) = out.get_mut(&shard) {
            e.1 = quantile(&summed, 0.99).map(|s| s * 1000.0);
        }
    }
    Ok(out)
}

/// How uneven a figure is over the nodes.
#[derive(Serialize, Clone, Debug)]
pub struct Skew {
    /// A sharded table, or `(all sharded tables)` for the nodes' totals.
    pub table: String,
    pub mean: f64,
    pub max: i64,
    /// max / mean: 1.0 is perfectly even.
    pub max_over_mean: f64,
    /// Standard deviation / mean: 0.0 is perfectly even.
    pub cv: f64,
}

/// The name of the skew entry for the nodes' totals of all sharded tables.
pub const ALL_SHARDED: &str = "(all sharded tables)";

/// One of the largest units: a bucket or a tenant.
#[derive(Serialize, Clone, Debug)]
pub struct Unit {
    /// As the `rebalance` CLI writes units: `bucket:17`, `tenant:acme`.
    pub unit: String,
    pub node: String,
    pub rows: i64,
    pub bytes: i64,
}

#[derive(Serialize, Clone, Debug)]
pub struct Report {
    pub strategy: Strategy,
    pub key: String,
    pub nodes: Vec<NodeFigures>,
    pub tables: Vec<TableFigures>,
    pub skew: Vec<Skew>,
    pub top_units: Vec<Unit>,
    /// What `rebalance plan` (by rows, threshold 10%) would move; empty when balanced or when units do not
    /// move (only hash buckets do so far).
    pub plan: Vec<crate::plan::PlannedMove>,
}

async fn connect(name: &str, addr: &NodeAddr, db: Option<&str>) -> Result<tokio_postgres::Client> {
    let (mut cfg, tls) = shard_catalog::pg_config(addr, db, "rebalance report")?;
    let (client, conn) = cfg
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect(tls)
        .await
        .with_context(|| format!("node {name} ({addr})"))?;
    tokio::spawn(conn);
    Ok(client)
}

/// Reads every node named in the config and makes the report.
pub async fn gather(config: &Config, top: usize) -> Result<Report> {
    gather_with(config, top, &[], std::time::Duration::ZERO).await
}

/// [`gather`], with the routers' `/metrics` URLs (sampled `sample` apart) for statements per second and p99.
pub async fn gather_with(
    config: &Config,
    top: usize,
    metrics: &[String],
    sample: std::time::Duration,
) -> Result<Report> {
    let traffic = if metrics.is_empty() { Default::default() } else { router_figures(metrics, sample).await? };
    let mut tables = Vec::new();
    let mut units = Vec::new();
    for (name, addr) in &config.nodes {
        if config.strategy == Strategy::Tenant {
            // Units are the tenants' databases on this node.
            let db = connect(name, addr, None).await?;
            let rows = db
                .query(
                    "SELECT datname, pg_database_size(datname) FROM pg_database \
                     WHERE datname LIKE $1 || '%' AND datname <> $1 || 'template' ORDER BY 2 DESC",
                    &[&config.tenant_db_prefix],
                )
                .await?;
            for r in rows {
                let datname: String = r.get(0);
                let tenant = datname.strip_prefix(config.tenant_db_prefix.as_str()).unwrap_or(&datname).to_string();
                units.push(Unit { unit: format!("tenant:{tenant}"), node: name.clone(), rows: 0, bytes: r.get(1) });
            }
            continue;
        }
        let db = connect(name, addr, None).await?;
        let (key_tables, key_columns): (Vec<String>, Vec<String>) =
            config.table_keys.iter().map(|(t, k)| (t.clone(), k.clone())).unzip();
        let listed = db
            .query(
                "SELECT n.nspname, c.relname, pg_total_relation_size(c.oid), \
                 EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = k.key AND NOT a.attisdropped) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, \
                   LATERAL (SELECT coalesce((SELECT tk.k FROM unnest($2::text[], $3::text[]) AS tk(t, k) WHERE tk.t = c.relname), $1) AS key) k \
                 WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                 AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2",
                &[&config.shard_key, &key_tables, &key_columns],
            )
            .await
            .with_context(|| format!("listing the tables of node {name}"))?;
        for r in listed {
            let (schema, table): (String, String) = (r.get(0), r.get(1));
            let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
            let shown = if schema == "public" { table.clone() } else { format!("{schema}.{table}") };
            let global = config.global_tables.iter().any(|g| g.eq_ignore_ascii_case(&table));
            let sharded = r.get::<_, bool>(3) && !global;
            let rows: i64 = db.query_one(&format!("SELECT count(*) FROM {qualified}"), &[]).await?.get(0);
            tables.push(TableFigures { node: name.clone(), table: shown.clone(), rows, bytes: r.get(2), sharded });
            if sharded
                && config.algorithm == shardmap::config::Algorithm::HashBuckets
                && config.strategy == Strategy::Hash
            {
                let key = quote_ident(config.table_keys.get(&table).unwrap_or(&config.shard_key));
                let slot = shardmap::hash::sql_slot_expr(&key, config.key_type, config.buckets);
                let q = format!(
                    "SELECT {slot} AS b, count(*) FROM {qualified} WHERE {key} IS NOT NULL GROUP BY 1 ORDER BY 2 DESC LIMIT {top}"
                );
                for b in db.query(&q, &[]).await? {
                    let bucket: i64 = b.get(0);
                    units.push(Unit { unit: format!("bucket:{bucket}"), node: name.clone(), rows: b.get(1), bytes: 0 });
                }
            }
        }
    }
    // Buckets: the same bucket of several tables is one unit.
    let mut merged: Vec<Unit> = Vec::new();
    for u in units {
        match merged.iter_mut().find(|m| m.unit == u.unit && m.node == u.node) {
            Some(m) => {
                m.rows += u.rows;
                m.bytes += u.bytes;
            }
            None => merged.push(u),
        }
    }
    merged.sort_by_key(|u| std::cmp::Reverse((u.rows, u.bytes)));
    merged.truncate(top);

    let node_names: Vec<String> = config.nodes.iter().map(|(n, _)| n.clone()).collect();
    let nodes: Vec<NodeFigures> = node_names
        .iter()
        .map(|n| NodeFigures {
            statements_per_s: traffic.get(n).map(|t| t.0),
            p99_ms: traffic.get(n).and_then(|t| t.1),
            node: n.clone(),
            rows: tables.iter().filter(|t| &t.node == n && t.sharded).map(|t| t.rows).sum(),
            bytes: tables.iter().filter(|t| &t.node == n).map(|t| t.bytes).sum::<i64>()
                + merged.iter().filter(|u| &u.node == n).map(|u| u.bytes).sum::<i64>(),
        })
        .collect();
    let mut skew = Vec::new();
    let mut sharded_tables: Vec<&str> = tables.iter().filter(|t| t.sharded).map(|t| t.table.as_str()).collect();
    sharded_tables.sort();
    sharded_tables.dedup();
    for t in &sharded_tables {
        let per_node: Vec<i64> = node_names
            .iter()
            .map(|n| tables.iter().find(|x| &x.node == n && x.table == *t).map_or(0, |x| x.rows))
            .collect();
        skew.push(skew_of(t, &per_node));
    }
    if !sharded_tables.is_empty() {
        skew.push(skew_of(ALL_SHARDED, &nodes.iter().map(|n| n.rows).collect::<Vec<_>>()));
    }
    let by = match config.strategy {
        Strategy::Hash if config.algorithm == shardmap::config::Algorithm::HashBuckets => Some(crate::plan::By::Rows),
        Strategy::Tenant => Some(crate::plan::By::Bytes),
        _ => None,
    };
    let plan = match by {
        Some(by) => {
            let sizes = crate::plan::unit_sizes(config).await?;
            let goal = crate::plan::Goal::Even;
            crate::plan::propose(&sizes, &node_names, by, &goal, 0.1, &Default::default())?.moves
        }
        None => Vec::new(),
    };
    Ok(Report {
        strategy: config.strategy,
        key: config.shard_key.clone(),
        nodes,
        tables,
        skew,
        top_units: merged,
        plan,
    })
}

/// max/mean and the coefficient of variation of `values`.
pub fn skew_of(table: &str, values: &[i64]) -> Skew {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<i64>() as f64 / n;
    let max = values.iter().copied().max().unwrap_or(0);
    let var = values.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n;
    let (max_over_mean, cv) = if mean > 0.0 { (max as f64 / mean, var.sqrt() / mean) } else { (1.0, 0.0) };
    Skew { table: table.to_string(), mean, max, max_over_mean, cv }
}

/// The report as a terminal table.
pub fn to_table(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "strategy {:?}, key {}\n", r.strategy, r.key);
    let _ = writeln!(out, "{:<16} {:>14} {:>14} {:>14} {:>10}", "node", "rows", "bytes", "statements/s", "p99 ms");
    for n in &r.nodes {
        let rate = n.statements_per_s.map_or("-".to_string(), |v| format!("{v:.1}"));
        let p99 = n.p99_ms.map_or("-".to_string(), |v| format!("{v:.2}"));
        let _ = writeln!(out, "{:<16} {:>14} {:>14} {rate:>14} {p99:>10}", n.node, n.rows, n.bytes);
    }
    if !r.tables.is_empty() {
        let _ = writeln!(out, "\n{:<16} {:<28} {:>12} {:>14} {:>8}", "node", "table", "rows", "bytes", "sharded");
        for t in &r.tables {
            let _ = writeln!(out, "{:<16} {:<28} {:>12} {:>14} {:>8}", t.node, t.table, t.rows, t.bytes, t.sharded);
        }
    }
    if !r.skew.is_empty() {
        let _ = writeln!(out, "\n{:<28} {:>12} {:>12} {:>9} {:>7}", "skew of rows", "mean", "max", "max/mean", "cv");
        for s in &r.skew {
            let _ =
                writeln!(out, "{:<28} {:>12.1} {:>12} {:>9.2} {:>7.2}", s.table, s.mean, s.max, s.max_over_mean, s.cv);
        }
    }
    if !r.top_units.is_empty() {
        let _ = writeln!(out, "\n{:<20} {:<16} {:>12} {:>14}", "largest units", "node", "rows", "bytes");
        for u in &r.top_units {
            let _ = writeln!(out, "{:<20} {:<16} {:>12} {:>14}", u.unit, u.node, u.rows, u.bytes);
        }
    }
    if !r.plan.is_empty() {
        let _ = writeln!(out, "\n`rebalance plan` would move {} units (by rows, 10%):", r.plan.len());
        for m in &r.plan {
            let _ = writeln!(out, "  {} {} -> {} ({:.0} rows)", m.unit, m.from, m.to, m.figure);
        }
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The report as CSV: one row per table and node, then one per unit (`kind` tells which).
pub fn to_csv(r: &Report) -> String {
    let mut out = String::from("kind,node,name,rows,bytes,statements_per_s,p99_ms\n");
    for t in &r.tables {
        let _ = writeln!(out, "table,{},{},{},{},,", csv_field(&t.node), csv_field(&t.table), t.rows, t.bytes);
    }
    for u in &r.top_units {
        let _ = writeln!(out, "unit,{},{},{},{},,", csv_field(&u.node), csv_field(&u.unit), u.rows, u.bytes);
    }
    for m in &r.plan {
        let _ = writeln!(
            out,
            "move,{},{} to {},{:.0},,,",
            csv_field(&m.from),
            csv_field(&m.unit),
            csv_field(&m.to),
            m.figure
        );
    }
    for n in &r.nodes {
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
        let _ = writeln!(
            out,
            "node,{},,{},{},{},{}",
            csv_field(&n.node),
            n.rows,
            n.bytes,
            opt(n.statements_per_s),
            opt(n.p99_ms)
        );
    }
    out
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A horizontal SVG bar chart of (label, value).
fn bars(title: &str, items: &[(String, i64)]) -> String {
    let max = items.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1) as f64;
    let h = 24 * items.len() + 30;
    let mut svg = format!(
        "<h2>{}</h2>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"640\" height=\"{h}\" role=\"img\">\n",
        html_escape(title)
    );
    for (i, (label, v)) in items.iter().enumerate() {
        let y = 10 + 24 * i;
        let w = (*v as f64 / max * 400.0).round() as i64;
        let _ = writeln!(
            svg,
            "<text x=\"0\" y=\"{}\" font-size=\"13\">{}</text><rect x=\"150\" y=\"{y}\" width=\"{w}\" height=\"18\" fill=\"#4a7ebb\"/><text x=\"{}\" y=\"{}\" font-size=\"12\">{v}</text>",
            y + 14,
            html_escape(label),
            155 + w,
            y + 14
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The report as one self-contained HTML page with SVG bar charts.
pub fn to_html(r: &Report) -> String {
    let mut out = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>shard balance</title>\n\
         <style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style>\n\
         </head><body>\n<h1>Shard balance</h1>\n",
    );
    let _ = writeln!(out, "<p>strategy {:?}, key <code>{}</code></p>", r.strategy, html_escape(&r.key));
    out.push_str(&bars(
        "Rows of sharded tables per node",
        &r.nodes.iter().map(|n| (n.node.clone(), n.rows)).collect::<Vec<_>>(),
    ));
    out.push_str(&bars("Bytes per node", &r.nodes.iter().map(|n| (n.node.clone(), n.bytes)).collect::<Vec<_>>()));
    if r.nodes.iter().any(|n| n.statements_per_s.is_some()) {
        out.push_str(&bars(
            "Statements per second per node",
            &r.nodes
                .iter()
                .map(|n| (n.node.clone(), n.statements_per_s.unwrap_or(0.0).round() as i64))
                .collect::<Vec<_>>(),
        ));
    }
    if !r.top_units.is_empty() {
        out.push_str(&bars(
            "Largest units",
            &r.top_units.iter().map(|u| (format!("{} ({})", u.unit, u.node), u.rows.max(u.bytes))).collect::<Vec<_>>(),
        ));
    }
    out.push_str(
        "<h2>Skew of rows</h2>\n<table><tr><th>table</th><th>mean</th><th>max</th><th>max/mean</th><th>cv</th></tr>\n",
    );
    for s in &r.skew {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{:.1}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td></tr>",
            html_escape(&s.table),
            s.mean,
            s.max,
            s.max_over_mean,
            s.cv
        );
    }
    out.push_str("</table>\n<h2>Tables</h2>\n<table><tr><th>node</th><th>table</th><th>rows</th><th>bytes</th><th>sharded</th></tr>\n");
    for t in &r.tables {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            html_escape(&t.node),
            html_escape(&t.table),
            t.rows,
            t.bytes,
            t.sharded
        );
    }
    out.push_str("</table>\n");
    if !r.plan.is_empty() {
        let _ = writeln!(
            out,
            "<h2>What <code>rebalance plan</code> would move (by rows, 10%)</h2>\n<table><tr><th>unit</th><th>from</th><th>to</th><th>rows</th></tr>"
        );
        for m in &r.plan {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td></tr>",
                html_escape(&m.unit),
                html_escape(&m.from),
                html_escape(&m.to),
                m.figure
            );
        }
        out.push_str("</table>\n");
    }
    out.push_str("</body></html>\n");
    out
}

/// A label value in Prometheus' text format.
fn prom_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A sample value in Prometheus' text format (`+Inf`, `-Inf`, `NaN` as it spells them).
fn prom_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_string()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else {
        format!("{v}")
    }
}

/// The report in Prometheus' text exposition format (`--format prom`), for node_exporter's textfile
/// collector or a push from cron: gauges with the prefix `shard_balance_`, each family with HELP and TYPE.
///
/// - `shard_balance_node_rows{node}`, `shard_balance_node_bytes{node}`: the nodes' totals (rows of sharded
///   tables; bytes of all tables, and of tenant databases);
/// - `shard_balance_table_rows{node,table,sharded}`, `shard_balance_table_bytes{...}`: per table and node;
/// - `shard_balance_skew_ratio{by}`, `shard_balance_skew_cv{by}`: max/mean and the coefficient of variation
///   over the nodes of their rows (`by="rows"`, the report's "(all sharded tables)" skew, when there are
///   sharded tables) and of their bytes (`by="bytes"`);
/// - `shard_balance_table_skew_ratio{table}`, `shard_balance_table_skew_cv{table}`: the same per sharded table;
/// - `shard_balance_unit_rows{unit,node}`, `shard_balance_unit_bytes{unit,node}`: the largest units (`--top`);
/// - `shard_balance_planned_moves`: how many moves `rebalance plan` (by rows, 10%) would make;
/// - `shard_balance_node_statements_per_second{node}`, `shard_balance_node_p99_seconds{node}` (with `--metrics`);
/// - `shard_balance_report_timestamp_seconds`: when the report was made (Unix time), to alert on a stale file.
pub fn to_prom(r: &Report) -> String {
    let mut out = String::new();
    let family = |out: &mut String, name: &str, help: &str| {
        let _ = writeln!(out, "# HELP shard_balance_{name} {help}\n# TYPE shard_balance_{name} gauge");
    };
    family(&mut out, "node_rows", "Rows of sharded tables on the node.");
    for n in &r.nodes {
        let _ = writeln!(out, "shard_balance_node_rows{{node=\"{}\"}} {}", prom_label(&n.node), n.rows);
    }
    family(&mut out, "node_bytes", "Bytes of the node's tables (pg_total_relation_size) and tenant databases.");
    for n in &r.nodes {
        let _ = writeln!(out, "shard_balance_node_bytes{{node=\"{}\"}} {}", prom_label(&n.node), n.bytes);
    }
    if !r.tables.is_empty() {
        for (metric, help) in
            [("table_rows", "Rows of a table on a node."), ("table_bytes", "Bytes of a table on a node.")]
        {
            family(&mut out, metric, help);
            for t in &r.tables {
                let v = if metric == "table_rows" { t.rows } else { t.bytes };
                let _ = writeln!(
                    out,
                    "shard_balance_{metric}{{node=\"{}\",table=\"{}\",sharded=\"{}\"}} {v}",
                    prom_label(&t.node),
                    prom_label(&t.table),
                    t.sharded
                );
            }
        }
    }
    let all = r.skew.iter().find(|s| s.table == ALL_SHARDED);
    let bytes = skew_of("bytes", &r.nodes.iter().map(|n| n.bytes).collect::<Vec<_>>());
    family(&mut out, "skew_ratio", "Max over mean of the nodes' rows (by=rows) or bytes (by=bytes); 1 is even.");
    if let Some(s) = all {
        let _ = writeln!(out, "shard_balance_skew_ratio{{by=\"rows\"}} {}", prom_value(s.max_over_mean));
    }
    let _ = writeln!(out, "shard_balance_skew_ratio{{by=\"bytes\"}} {}", prom_value(bytes.max_over_mean));
    family(&mut out, "skew_cv", "Coefficient of variation (stddev/mean) of the nodes' rows or bytes; 0 is even.");
    if let Some(s) = all {
        let _ = writeln!(out, "shard_balance_skew_cv{{by=\"rows\"}} {}", prom_value(s.cv));
    }
    let _ = writeln!(out, "shard_balance_skew_cv{{by=\"bytes\"}} {}", prom_value(bytes.cv));
    let tables: Vec<&Skew> = r.skew.iter().filter(|s| s.table != ALL_SHARDED).collect();
    if !tables.is_empty() {
        family(&mut out, "table_skew_ratio", "Max over mean of a sharded table's rows over the nodes; 1 is even.");
        for s in &tables {
            let _ = writeln!(
                out,
                "shard_balance_table_skew_ratio{{table=\"{}\"}} {}",
                prom_label(&s.table),
                prom_value(s.max_over_mean)
            );
        }
        family(&mut out, "table_skew_cv", "Coefficient of variation of a sharded table's rows over the nodes.");
        for s in &tables {
            let _ =
                writeln!(out, "shard_balance_table_skew_cv{{table=\"{}\"}} {}", prom_label(&s.table), prom_value(s.cv));
        }
    }
    if !r.top_units.is_empty() {
        for (metric, help) in [
            ("unit_rows", "Rows of one of the largest units (bucket, tenant)."),
            ("unit_bytes", "Bytes of one of the largest units (tenant databases)."),
        ] {
            family(&mut out, metric, help);
            for u in &r.top_units {
                let v = if metric == "unit_rows" { u.rows } else { u.bytes };
                let _ = writeln!(
                    out,
                    "shard_balance_{metric}{{unit=\"{}\",node=\"{}\"}} {v}",
                    prom_label(&u.unit),
                    prom_label(&u.node)
                );
            }
        }
    }
    family(&mut out, "planned_moves", "Moves rebalance plan (by rows, 10%) would make; 0 when balanced.");
    let _ = writeln!(out, "shard_balance_planned_moves {}", r.plan.len());
    if r.nodes.iter().any(|n| n.statements_per_s.is_some()) {
        family(&mut out, "node_statements_per_second", "Statements per second the routers sent the node (sampled).");
        for n in &r.nodes {
            if let Some(v) = n.statements_per_s {
                let _ = writeln!(
                    out,
                    "shard_balance_node_statements_per_second{{node=\"{}\"}} {}",
                    prom_label(&n.node),
                    prom_value(v)
                );
            }
        }
    }
    if r.nodes.iter().any(|n| n.p99_ms.is_some()) {
        family(&mut out, "node_p99_seconds", "99th percentile of the node's statement latency (routers' histograms).");
        for n in &r.nodes {
            if let Some(v) = n.p99_ms {
                let _ = writeln!(
                    out,
                    "shard_balance_node_p99_seconds{{node=\"{}\"}} {}",
                    prom_label(&n.node),
                    prom_value(v / 1000.0)
                );
            }
        }
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    family(&mut out, "report_timestamp_seconds", "When this report was made (Unix time).");
    let _ = writeln!(out, "shard_balance_report_timestamp_seconds {now}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_and_quantile() {
        let text = "# TYPE x counter\nshard_router_queries_total{shard=\"0\"} 100\n\
            shard_router_query_duration_seconds_bucket{shard=\"0\",le=\"0.001\"} 90\n\
            shard_router_query_duration_seconds_bucket{shard=\"0\",le=\"0.01\"} 99\n\
            shard_router_query_duration_seconds_bucket{shard=\"0\",le=\"+Inf\"} 100\n";
        let s = parse_metrics(text);
        assert_eq!(s.queries["0"], 100.0);
        assert_eq!(quantile(&s.buckets["0"], 0.99), Some(0.01));
        assert_eq!(quantile(&s.buckets["0"], 0.5), Some(0.001));
        assert_eq!(quantile(&[], 0.99), None);
    }

    #[test]
    fn prom_text() {
        let r = Report {
            strategy: Strategy::Hash,
            key: "user_id".into(),
            nodes: vec![
                NodeFigures { node: "0".into(), rows: 30, bytes: 100, statements_per_s: None, p99_ms: None },
                NodeFigures { node: "1\"x".into(), rows: 10, bytes: 100, statements_per_s: None, p99_ms: None },
            ],
            tables: vec![],
            skew: vec![skew_of("t", &[30, 10]), skew_of(ALL_SHARDED, &[30, 10])],
            top_units: vec![],
            plan: vec![],
        };
        let text = to_prom(&r);
        assert!(text.contains("shard_balance_node_rows{node=\"1\\\"x\"} 10\n"), "{text}");
        assert!(text.contains("shard_balance_skew_ratio{by=\"rows\"} 1.5\n"), "{text}");
        assert!(text.contains("shard_balance_skew_ratio{by=\"bytes\"} 1\n"), "{text}");
        assert!(text.contains("shard_balance_table_skew_cv{table=\"t\"} 0.5\n"), "{text}");
        assert!(text.contains("# TYPE shard_balance_planned_moves gauge\nshard_balance_planned_moves 0\n"), "{text}");
        assert!(!text.contains("statements_per_second"), "{text}");
        assert_eq!(prom_value(f64::INFINITY), "+Inf");
    }

    #[test]
    fn skew_figures() {
        let s = skew_of("t", &[10, 10, 10, 10]);
        assert_eq!((s.max_over_mean, s.cv), (1.0, 0.0));
        let s = skew_of("t", &[30, 10]);
        assert!((s.max_over_mean - 1.5).abs() < 1e-9);
        assert!((s.cv - 0.5).abs() < 1e-9);
        let s = skew_of("t", &[0, 0]);
        assert_eq!((s.max_over_mean, s.cv), (1.0, 0.0));
    }
}
