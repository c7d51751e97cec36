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
        Ok(d) => match rows(&d, sql, &map) {
            Ok(rows) => {
                let mut j = d.to_json(&map);
                if let (Some(o), Some(rows)) = (j.as_object_mut(), rows) {
                    o.extend(rows);
                }
                (j, ExitCode::SUCCESS)
            }
            Err(e) => (e.to_json(&map), ExitCode::from(1)),
        },
        Err(e) => (e.to_json(&map), ExitCode::from(1)),
    };
    println!("{json}");
    Ok(code)
}

/// For a read on several shards: how their rows become the answer (`"rows"`: `concatenated` or
/// `combined`, with what each shard runs and how the router merges), or the refusal the router would give.
fn rows(
    d: &shardmap::Decision,
    sql: &str,
    map: &ShardMap,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, shardmap::RouteError> {
    use shardmap::sql::{Cross, Kind};
    let Some(st) = d.analysis.statements.first() else { return Ok(None) };
    if st.kind != Kind::Read || !matches!(d.target, shardmap::Target::All | shardmap::Target::Set(_)) {
        return Ok(None);
    }
    let mut o = serde_json::Map::new();
    if st.cross != Cross::Combine {
        o.insert("rows".into(), "concatenated".into());
        return Ok(Some(o));
    }
    let plan = shardmap::sql::combine_plan(sql).map_err(|why| {
        shardmap::RouteError::Refused(format!(
            "{why} across shards is not supported: the shards' answers cannot be combined into one PostgreSQL's answer; add a {} condition to read one shard",
            map.key
        ))
    })?;
    o.insert("rows".into(), "combined".into());
    o.insert("shard_sql".into(), plan.shard_sql.clone().into());
    let merge = match &plan.stream {
        Some(s) if s.limit.is_none_or(|l| l + s.offset >= router::frontend::stream::STREAM_FROM) => {
            "merged as they come when the sort keys are integers, floats, numeric, bool, dates, times or uuids; else a final query over the shards' rows"
        }
        _ => "a final query over the shards' rows, on the first shard's connection",
    };
    o.insert("merge".into(), merge.into());
    Ok(Some(o))
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
