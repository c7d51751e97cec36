//! `shard-router explain` and `check`: the routing decision and the config, printed as JSON.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use shardmap::{Config, Planner, Session, ShardMap, TextParams};

fn load(path: &Path) -> anyhow::Result<(Config, Arc<ShardMap>)> {
    let config = Config::load(path)?;
    let map = ShardMap::new(&config).map_err(anyhow::Error::msg).with_context(|| format!("{}", path.display()))?;
    Ok((config, Arc::new(map)))
}

pub fn run(
    path: &Path,
    params: Vec<String>,
    tenant: Option<String>,
    database: Option<String>,
    shard_key: Option<String>,
    sql: &str,
) -> anyhow::Result<ExitCode> {
    let (_, map) = load(path)?;
    let planner = Planner::new(map.clone());
    let mut session = Session { database, tenant, ..Default::default() };
    if let Some(k) = shard_key {
        session.apply(&shardmap::sql::SessionChange::ShardKey(Some(k)), &map)?;
    }
    let params = TextParams(params.into_iter().map(|p| (p != "NULL").then_some(p)).collect());
    let (json, code) = match planner.decide(sql, &params, &session) {
        Ok(d) => (d.to_json(&map), ExitCode::SUCCESS),
        Err(e) => (e.to_json(&map), ExitCode::from(1)),
    };
    println!("{json}");
    Ok(code)
}

pub fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let (config, map) = load(path)?;
    let nodes: Vec<_> = map
        .nodes
        .iter()
        .map(|n| serde_json::json!({"name": n.name, "address": n.addr.as_ref().map(|a| a.to_string())}))
        .collect();
    println!("{}", serde_json::to_string_pretty(&serde_json::json!({"config": config, "nodes": nodes}))?);
    Ok(ExitCode::SUCCESS)
}
