//! The planner on SQL text with parameters, under each strategy: any text is a decision or a refusal, never
//! a panic. Input: one byte choosing the configuration, the statement, then NUL-separated parameter values
//! (a lone 0x01 is NULL). And the protocol paths agree: a statement without parameters takes the same
//! decision through the simple protocol (literals taken out into a shape) as through Parse/Bind.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use shardmap::{Config, NoParams, Planner, Session, ShardMap, TextParams};

const CONFIGS: &[&str] = &[
    "shard-strategy,hash\nshard-count,4\nshard-key,user_id\nshard-algorithm,modulo\nshard-global-tables,bots,tools\nshard-table-users,id\n",
    "shard-strategy,hash\nshard-count,3\nshard-key,user_id\nshard-key-type,uuid\nshard-algorithm,hash-buckets\nshard-global-tables,bots\n",
    "shard-strategy,hash\nshard-count,2\nshard-key,user_id\nshard-key-type,text\nshard-algorithm,hash-buckets\n",
    "shard-strategy,range\nshard-key,user_id\nshard-ranges,0-999:a,1000-1999:b,2000-:c\n",
    "shard-strategy,tenant\nshard-tenant-db-prefix,gb_tenant_\nshard-auto-create,true\n",
];

fn planners() -> &'static Vec<Planner> {
    static P: OnceLock<Vec<Planner>> = OnceLock::new();
    P.get_or_init(|| {
        CONFIGS
            .iter()
            .map(|c| {
                let config = Config::parse("fuzz.csv", c.as_bytes()).expect("config");
                Planner::new(Arc::new(ShardMap::new(&config).expect("map")))
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let mut parts = text.split('\0');
    let sql = parts.next().unwrap_or_default();
    let params: Vec<Option<String>> = parts.map(|p| (p != "\u{1}").then(|| p.to_string())).collect();
    let planner = &planners()[which as usize % CONFIGS.len()];
    let session = Session::default();
    let extended = planner.decide(sql, &TextParams(params), &session);
    if let Ok(d) = &extended {
        let _ = d.to_json(planner.map());
    }
    if !sql.contains('$') {
        let simple = planner.decide_simple(sql, &session);
        let plain = planner.decide(sql, &NoParams, &session);
        match (&simple, &plain) {
            (Ok(s), Ok(p)) => assert_eq!(s.target, p.target, "{sql:?}: the simple and extended protocols differ"),
            (Err(_), Err(_)) => {}
            _ => panic!("{sql:?}: simple {simple:?}, extended {plain:?}"),
        }
    }
});
