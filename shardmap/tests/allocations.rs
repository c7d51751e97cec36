//! The routing decision of a statement whose analysis is cached allocates nothing on one node, once on
//! several (the decision's key values) — literals taken out of a simple-protocol statement into a list the
//! caller keeps (`shape::spare`), parameters of a Bind read in place. A regression here is an allocation
//! on every statement the router relays (docs/performance.md, "No allocation per statement").

use std::sync::Arc;

use shardmap::shape::{spare, Literal};
use shardmap::{Config, Planner, Session, ShardMap, Target, TextParams};

fn planner(config: &str) -> Planner {
    let c = Config::parse("test.csv", config.as_bytes()).expect("config");
    Planner::new(Arc::new(ShardMap::new(&c).expect("map")))
}

const ONE: &str = "shard-strategy,hash\nshard-count,1\nshard-key,aid\n";
const FOUR: &str = "shard-strategy,hash\nshard-count,4\nshard-key,aid\n";
const SQL: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 4242";
const BOUND: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";

/// Allocations of one simple-protocol statement's analysis and decision, the list kept from the last one.
fn simple_statement(p: &Planner, session: &Session, kept: &mut Vec<Literal<'static>>) -> (u64, Target) {
    let sql = String::from(SQL);
    let mut target = Target::Any;
    let info = allocation_counter::measure(|| {
        let mut lits = std::mem::take(kept);
        let a = p.analyze_simple(&sql, &mut lits);
        target = p.decide_shaped(&a, &lits, session).expect("routed").target;
        *kept = spare(lits);
    });
    (info.count_total, target)
}

#[test]
fn a_simple_statement_allocates_nothing_on_one_node_and_once_on_four() {
    for (config, allocations) in [(ONE, 0), (FOUR, 1)] {
        let p = planner(config);
        let session = Session::default();
        let mut kept = Vec::new();
        // The first statement parses and caches its analysis, and grows the kept list.
        simple_statement(&p, &session, &mut kept);
        for _ in 0..3 {
            let (count, target) = simple_statement(&p, &session, &mut kept);
            assert!(matches!(target, Target::One(_)), "{target:?}");
            assert_eq!(count, allocations, "allocations per statement with {config:?}");
        }
    }
}

#[test]
fn a_bound_statement_allocates_nothing_on_one_node_and_once_on_four() {
    for (config, allocations) in [(ONE, 0), (FOUR, 1)] {
        let p = planner(config);
        let session = Session::default();
        let params = TextParams(vec![Some("4242".into())]);
        let a = p.analyze(BOUND);
        p.decide_analyzed(&a, &params, &session).expect("routed");
        for _ in 0..3 {
            let info = allocation_counter::measure(|| {
                let a = p.analyze(BOUND);
                let d = p.decide_analyzed(&a, &params, &session).expect("routed");
                assert!(matches!(d.target, Target::One(_)), "{:?}", d.target);
            });
            assert_eq!(info.count_total, allocations, "allocations per Bind with {config:?}");
        }
    }
}
