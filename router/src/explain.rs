//! `shard-router explain` and `check`: the routing decision (on the live shard map) and the config, printed as
//! JSON.

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

/// Brings `map` to what the live catalog says (bucket owners, range splits, tenant placements), unless
/// `offline`; returns the JSON fields that say which map the answer is from: `"source": "catalog"` (with the
/// catalog's `catalog_version`) or `"source": "config"` (with `catalog` saying why, when one is configured).
fn live(config: &Config, map: &ShardMap, offline: bool) -> serde_json::Map<String, serde_json::Value> {
    let mut o = serde_json::Map::new();
    o.insert("source".into(), "config".into());
    if offline {
        o.insert("catalog".into(), "not read (--offline)".into());
        return o;
    }
    let addr = match shardmap::catalog::address(config) {
        Ok(Some(a)) => a,
        Ok(None) => return o,
        Err(e) => {
            o.insert("catalog".into(), format!("shard-catalog: {e}").into());
            return o;
        }
    };
    let read = async {
        let client = shard_catalog::connect(&addr, None, "shard-router explain").await?;
        shard_catalog::load(&client, map).await
    };
    let answer =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(anyhow::Error::from).and_then(
            |rt| {
                rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(5), read).await })
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 5 s")))
            },
        );
    match answer {
        Ok(version) => {
            o.insert("source".into(), "catalog".into());
            o.insert("catalog_version".into(), version.into());
        }
        Err(e) if missing_catalog(&e) => {
            // Nothing was ever moved: config.csv is the live map.
            o.insert("catalog".into(), format!("{addr}: not made yet, nothing has moved").into());
        }
        Err(e) => {
            eprintln!(
                "shard-router explain: the catalog cannot be read ({e:#}); answering from config.csv alone, \
                 which does not know the moves made since (--offline says so without trying)"
            );
            o.insert("catalog".into(), format!("unreachable: {e:#}").into());
        }
    }
    o
}

/// Whether `e` says that the catalog's database or tables do not exist.
fn missing_catalog(e: &anyhow::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.chain()
        .filter_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .filter_map(|e| e.code())
        .any(|c| *c == SqlState::INVALID_CATALOG_NAME || *c == SqlState::UNDEFINED_TABLE)
}

/// What `explain` asks.
#[derive(Default)]
pub struct Question {
    /// Bind parameter values in text format (`None`: NULL).
    pub params: Vec<Option<String>>,
    pub tenant: Option<String>,
    pub database: Option<String>,
    pub shard_key: Option<String>,
    /// Read config.csv alone, not the catalog.
    pub offline: bool,
}

/// `shard-router explain`: prints the decision's JSON; exit status 0 routed, 1 refused.
pub fn run(path: &Path, q: Question, sql: &str) -> anyhow::Result<ExitCode> {
    let (json, routed) = explain(path, q, sql)?;
    println!("{json}");
    Ok(if routed { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The decision for `sql` as JSON, and whether it was routed (not refused).
pub fn explain(path: &Path, q: Question, sql: &str) -> anyhow::Result<(serde_json::Value, bool)> {
    let Question { params, tenant, database, shard_key, offline } = q;
    let (config, map) = load(path)?;
    let source = live(&config, &map, offline);
    let planner = Planner::new(map.clone());
    let mut session = Session { database, tenant, ..Default::default() };
    if let Some(k) = shard_key {
        session.apply(&shardmap::sql::SessionChange::ShardKey(Some(k)), &map)?;
    }
    let params = TextParams(params);
    let (json, code) = match planner.decide(sql, &params, &session) {
        Ok(d) => match rows(&d, sql, &map) {
            Ok(rows) => {
                let mut j = d.to_json(&map);
                if let (Some(o), Some(rows)) = (j.as_object_mut(), rows) {
                    o.extend(rows);
                }
                (j, true)
            }
            Err(e) => (e.to_json(&map), false),
        },
        Err(e) => (e.to_json(&map), false),
    };
    let mut json = json;
    if let Some(o) = json.as_object_mut() {
        o.extend(source);
    }
    Ok((json, code))
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
        Some(s) if s.limit.is_none_or(|l| l + s.offset >= crate::frontend::stream::STREAM_FROM) => {
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
