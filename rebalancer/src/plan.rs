//! `rebalance plan`: proposed moves of hash buckets that even out rows, bytes or load over the nodes, or
//! fill a new node, or drain one. A dry run: it reads the nodes and the catalog, and writes a plan file that
//! `rebalance apply` carries out move by move.

use crate::quote_ident;
use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use shardmap::catalog::Unit;
use shardmap::{BucketId, Config, ShardMap};

/// What the plan evens out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum By {
    /// Rows of the sharded tables.
    Rows,
    /// Bytes of the rows (`pg_column_size` of each row: the data, without indexes or free space).
    Bytes,
    /// Statements per second from the routers' `/metrics`, shared out to a node's buckets by their rows.
    Load,
}

/// What the plan is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Goal {
    /// Every node within the threshold of the mean.
    Even,
    /// Bring this node (new, or light) up to the mean.
    Fill(String),
    /// Move every bucket off this node.
    Drain(String),
}

/// One unit's size where it is: a bucket (`bucket:17`) or a tenant (`tenant:acme`).
#[derive(Clone, Debug, Serialize)]
pub struct UnitSize {
    pub unit: String,
    pub node: String,
    pub rows: i64,
    pub bytes: i64,
}

/// One proposed move.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PlannedMove {
    pub unit: String,
    pub from: String,
    pub to: String,
    /// The bucket's figure (rows, bytes or statements per second).
    pub figure: f64,
}

/// A plan file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub by: By,
    pub goal: Goal,
    pub threshold: f64,
    /// Each node's figure now, and after the moves.
    pub before: BTreeMap<String, f64>,
    pub after: BTreeMap<String, f64>,
    pub moves: Vec<PlannedMove>,
}

/// Every unit's rows and bytes on the node that owns it: each bucket (rows counted, bytes of the rows'
/// data) under `hash-buckets`, each tenant's database (bytes: `pg_database_size`) under `tenant`. Owners come
/// from the catalog (config.csv's placement when there is none); buckets with no rows are listed with zeros.
pub async fn unit_sizes(config: &Config) -> Result<Vec<UnitSize>> {
    let map = ShardMap::new(config).map_err(anyhow::Error::msg)?;
    if let Some(addr) = shardmap::catalog::address(config).map_err(anyhow::Error::msg)? {
        let catalog = shard_catalog::ensure(&addr, &map, "rebalance plan").await?;
        shard_catalog::load(&catalog, &map).await?;
    }
    if map.strategy == shardmap::Strategy::Tenant {
        return tenant_sizes(&map).await;
    }
    let Some(n) = map.bucket_count() else {
        bail!("plan moves hash buckets (shard-algorithm,hash-buckets) and tenants (shard-strategy,tenant)");
    };
    let mut sizes: Vec<UnitSize> = (0..n)
        .map(|b| UnitSize {
            unit: Unit::Bucket(b).to_string(),
            node: map.node(map.bucket_owner(BucketId(b)).expect("a bucket")).name.clone(),
            rows: 0,
            bytes: 0,
        })
        .collect();
    let (key_tables, key_columns): (Vec<String>, Vec<String>) =
        map.table_keys.iter().map(|(t, k)| (t.clone(), k.clone())).unzip();
    for node in &map.nodes {
        let Some(addr) = &node.addr else { continue };
        let db = shard_catalog::connect(addr, None, "rebalance plan")
            .await
            .with_context(|| format!("node {}", node.name))?;
        let tables = db
            .query(
                "SELECT format('%I.%I', n.nspname, c.relname), c.relname, k.key FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, \
                   LATERAL (SELECT coalesce((SELECT tk.k FROM unnest($2::text[], $3::text[]) AS tk(t, k) WHERE tk.t = c.relname), $1) AS key) k \
                 WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
                   AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = k.key AND NOT a.attisdropped)",
                &[&map.key, &key_tables, &key_columns],
            )
            .await?;
        for t in tables {
            let (qualified, name, key): (String, String, String) = (t.get(0), t.get(1), t.get(2));
            let key = quote_ident(&key);
            let slot = shardmap::hash::sql_slot_expr(&format!("x.{key}"), map.key_type, n);
            if map.global_tables.contains(&name) {
                continue;
            }
            let q = format!(
                "SELECT ({slot})::int, count(*), sum(pg_column_size(x.*))::int8 FROM {qualified} x WHERE x.{key} IS NOT NULL GROUP BY 1"
            );
            for r in db.query(&q, &[]).await.with_context(|| format!("node {}: {qualified}", node.name))? {
                let b: i32 = r.get(0);
                if let Some(s) = sizes.get_mut(b as usize) {
                    // Rows found on a node that does not own the bucket (a move's leftovers) do not count.
                    if s.node == node.name {
                        s.rows += r.get::<_, i64>(1);
                        s.bytes += r.get::<_, Option<i64>>(2).unwrap_or(0);
                    }
                }
            }
        }
    }
    Ok(sizes)
}

/// Each tenant's database size on the node that owns it.
async fn tenant_sizes(map: &ShardMap) -> Result<Vec<UnitSize>> {
    let mut sizes = Vec::new();
    for node in &map.nodes {
        let Some(addr) = &node.addr else { continue };
        let db = shard_catalog::connect(addr, Some("postgres"), "rebalance plan")
            .await
            .with_context(|| format!("node {}", node.name))?;
        let rows = db
            .query(
                "SELECT datname::text, pg_database_size(datname) FROM pg_database \
                 WHERE datname LIKE $1 || '%' AND datname <> $1 || 'template'",
                &[&map.tenant_prefix],
            )
            .await?;
        for r in rows {
            let datname: String = r.get(0);
            let Some(tenant) = map.tenant_of_database(&datname) else { continue };
            // A copy left on a node that does not own the tenant (an aborted move) does not count.
            if map.node(map.tenant_shard(tenant)).name != node.name {
                continue;
            }
            sizes.push(UnitSize {
                unit: Unit::Tenant(tenant.to_string()).to_string(),
                node: node.name.clone(),
                rows: 0,
                bytes: r.get(1),
            });
        }
    }
    Ok(sizes)
}

/// The proposed moves for `goal`, by `by`, given bucket sizes, node names and (for `load`) each node's
/// statements per second.
pub fn propose(
    sizes: &[UnitSize],
    nodes: &[String],
    by: By,
    goal: &Goal,
    threshold: f64,
    load: &BTreeMap<String, f64>,
) -> Result<Plan> {
    // Load is shared out by rows, or by bytes where rows are not counted (tenants).
    let weight = |s: &UnitSize| if sizes.iter().any(|s| s.rows > 0) { s.rows } else { s.bytes };
    let weight_on = |n: &str| sizes.iter().filter(|s| s.node == n).map(weight).sum::<i64>().max(1) as f64;
    let figure = |s: &UnitSize| match by {
        By::Rows => s.rows as f64,
        By::Bytes => s.bytes as f64,
        By::Load => load.get(&s.node).copied().unwrap_or(0.0) * weight(s) as f64 / weight_on(&s.node),
    };
    for n in match goal {
        Goal::Fill(n) | Goal::Drain(n) => vec![n],
        Goal::Even => vec![],
    } {
        if !nodes.contains(n) {
            bail!("no node {n:?} in config.csv");
        }
    }
    let mut at: BTreeMap<String, f64> = nodes.iter().map(|n| (n.clone(), 0.0)).collect();
    let mut buckets: Vec<(String, String, f64)> = Vec::new();
    for s in sizes {
        let f = figure(s);
        *at.entry(s.node.clone()).or_default() += f;
        buckets.push((s.unit.clone(), s.node.clone(), f));
    }
    let before = at.clone();
    let mean = at.values().sum::<f64>() / at.len().max(1) as f64;
    let mut moves = Vec::new();
    let mut take = |buckets: &mut Vec<(String, String, f64)>, i: usize, to: &str, at: &mut BTreeMap<String, f64>| {
        let (unit, from, f) = buckets[i].clone();
        *at.get_mut(&from).expect("a node") -= f;
        *at.get_mut(to).expect("a node") += f;
        buckets[i].1 = to.to_string();
        moves.push(PlannedMove { unit, from, to: to.to_string(), figure: f });
    };
    // The largest bucket on `from` no larger than `room` (and not empty).
    let pick = |buckets: &Vec<(String, String, f64)>, from: &str, room: f64| {
        buckets
            .iter()
            .enumerate()
            .filter(|(_, (_, n, f))| n == from && *f > 0.0 && *f <= room)
            .max_by(|a, b| a.1 .2.total_cmp(&b.1 .2))
            .map(|(i, _)| i)
    };
    let extreme = |at: &BTreeMap<String, f64>, skip: Option<&str>, max: bool| {
        let it = at.iter().filter(|(n, _)| Some(n.as_str()) != skip);
        let e = if max { it.max_by(|a, b| a.1.total_cmp(b.1)) } else { it.min_by(|a, b| a.1.total_cmp(b.1)) };
        e.map(|(n, f)| (n.clone(), *f))
    };
    match goal {
        Goal::Even => {
            for _ in 0..buckets.len() {
                let (Some((hi, fh)), Some((lo, fl))) = (extreme(&at, None, true), extreme(&at, None, false)) else {
                    break;
                };
                if fh <= mean * (1.0 + threshold) {
                    break;
                }
                // Moving no more than half the gap never makes the pair worse.
                let Some(i) = pick(&buckets, &hi, (fh - fl) / 2.0) else { break };
                take(&mut buckets, i, &lo, &mut at);
            }
        }
        Goal::Fill(node) => {
            for _ in 0..buckets.len() {
                let f_node = at[node];
                if f_node >= mean * (1.0 - threshold) {
                    break;
                }
                let Some((hi, fh)) = extreme(&at, Some(node), true) else { break };
                let Some(i) = pick(&buckets, &hi, (mean - f_node).min(fh - f_node)) else { break };
                take(&mut buckets, i, node, &mut at);
            }
        }
        Goal::Drain(node) => {
            // Every bucket, empty ones too (new rows must not land there); largest first, to the lightest.
            let mut mine: Vec<usize> = (0..buckets.len()).filter(|i| &buckets[*i].1 == node).collect();
            mine.sort_by(|a, b| buckets[*b].2.total_cmp(&buckets[*a].2));
            for i in mine {
                let Some((lo, _)) = extreme(&at, Some(node), false) else {
                    bail!("nowhere to drain {node} to: it is the only node");
                };
                take(&mut buckets, i, &lo, &mut at);
            }
        }
    }
    Ok(Plan { by, goal: goal.clone(), threshold, before, after: at, moves })
}

/// A plan for a terminal.
pub fn to_text(p: &Plan) -> String {
    let by = match p.by {
        By::Rows => "rows",
        By::Bytes => "bytes",
        By::Load => "statements per second",
    };
    let goal = match &p.goal {
        Goal::Even => format!("even out {by} within {:.0}% of the mean", p.threshold * 100.0),
        Goal::Fill(n) => format!("fill {n} with {by} up to the mean"),
        Goal::Drain(n) => format!("drain {n}"),
    };
    let mut out = format!("{} moves to {goal}\n", p.moves.len());
    out.push_str(&format!("{:<10} {:>14} {:>14}\n", "node", "now", "after"));
    for (n, f) in &p.before {
        out.push_str(&format!("{n:<10} {f:>14.0} {:>14.0}\n", p.after.get(n).copied().unwrap_or(0.0)));
    }
    for m in &p.moves {
        out.push_str(&format!("  {} {} -> {} ({:.0})\n", m.unit, m.from, m.to, m.figure));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(rows: &[(u32, &str, i64)]) -> Vec<UnitSize> {
        rows.iter()
            .map(|(b, n, r)| UnitSize { unit: format!("bucket:{b}"), node: n.to_string(), rows: *r, bytes: r * 10 })
            .collect()
    }

    #[test]
    fn evens_out_without_overshooting() {
        let s = sizes(&[(0, "0", 900), (1, "1", 100), (2, "0", 500), (3, "1", 100), (4, "0", 50)]);
        let nodes = vec!["0".to_string(), "1".to_string()];
        let p = propose(&s, &nodes, By::Rows, &Goal::Even, 0.1, &Default::default()).unwrap();
        assert_eq!(p.before["0"], 1450.0);
        assert!(p.moves.iter().all(|m| m.from == "0" && m.to == "1"), "{p:?}");
        let mean = 825.0;
        assert!(p.after.values().all(|f| *f <= mean * 1.1 + 1.0) || p.moves.len() == 1, "{p:?}");
        assert!(p.after["0"] < p.before["0"]);
    }

    #[test]
    fn fills_and_drains() {
        let s = sizes(&[(0, "0", 100), (1, "1", 100), (2, "0", 100), (3, "1", 100)]);
        let nodes = vec!["0".to_string(), "1".to_string(), "2".to_string()];
        let p = propose(&s, &nodes, By::Rows, &Goal::Fill("2".into()), 0.2, &Default::default()).unwrap();
        assert_eq!(p.moves.len(), 1, "{p:?}");
        assert_eq!(p.moves[0].to, "2");
        let p = propose(&s, &nodes, By::Bytes, &Goal::Drain("1".into()), 0.1, &Default::default()).unwrap();
        assert_eq!(p.moves.len(), 2);
        assert!(p.moves.iter().all(|m| m.from == "1" && m.to != "1"));
        assert_eq!(p.after["1"], 0.0);
        assert!(propose(&s, &nodes, By::Rows, &Goal::Drain("9".into()), 0.1, &Default::default()).is_err());
    }
}
