//! The four strategies end to end through the planner, property tests for each, geo lookups in a MaxMind
//! database the test writes itself, and hostile input with a bounded cost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use shardmap::{Config, KeyValue, NoParams, Planner, RouteError, Session, ShardId, ShardMap, Target, TextParams};

fn map(text: &str) -> Arc<ShardMap> {
    Arc::new(ShardMap::new(&Config::parse("t.csv", text.as_bytes()).unwrap()).unwrap())
}

fn one(p: &Planner, sql: &str, session: &Session) -> (String, serde_json::Value) {
    let d = p.decide(sql, &NoParams, session).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let Target::One(s) = d.target else { panic!("{sql}: {:?}", d.target) };
    (p.map().node(s).name.clone(), d.to_json(p.map()))
}

const RANGE: &str = "shard-strategy,range\nshard-ranges,0-999999:shard1,1000000-1999999:shard2,2000000-:shard3\n";

#[test]
fn range_seed_example() {
    let p = Planner::new(map(RANGE));
    let s = Session::default();
    for (k, want) in [
        (0, "shard1"),
        (999_999, "shard1"),
        (1_000_000, "shard2"),
        (1_999_999, "shard2"),
        (2_000_000, "shard3"),
        (i64::MAX, "shard3"),
    ] {
        assert_eq!(one(&p, &format!("SELECT * FROM users WHERE user_id = {k}"), &s).0, want, "{k}");
    }
    let e = p.decide("SELECT * FROM users WHERE user_id = -1", &NoParams, &s).unwrap_err();
    assert!(matches!(e, RouteError::Place(_)), "{e}");
    assert_eq!(e.to_string(), "user_id = -1 is outside every range of shard-ranges");
    let e = p.decide("SELECT * FROM users WHERE user_id = 'abc'", &NoParams, &s).unwrap_err();
    assert_eq!(e.to_string(), "user_id = abc: range sharding needs an integer key");
}

#[test]
fn modulo_seed_example() {
    // "User ID: 12345 Hash: 12345 % 4 = 1 Shard: shard-1"
    let m = map("shard-strategy,hash\nshard-count,4\nshard-key,user_id\nshard-algorithm,modulo\n");
    assert_eq!(m.locate(&KeyValue::Int(12345)).unwrap().shard, ShardId(1));
    assert_eq!(m.node(ShardId(1)).name, "1");
}

#[test]
fn hash_buckets_move_little_when_a_node_is_added() {
    // With buckets, adding a node moves whole buckets: only keys of moved buckets change shards. The initial
    // spread (bucket b on node b % N) is even.
    let m4 = map("shard-strategy,hash\nshard-count,4\nshard-algorithm,hash-buckets\n");
    assert_eq!(m4.bucket_count(), Some(1024));
    let mut per_node = BTreeMap::new();
    for k in 0..40_000i64 {
        *per_node.entry(m4.locate(&KeyValue::Int(k)).unwrap().shard).or_insert(0) += 1;
    }
    for (_, n) in per_node {
        assert!((9_000..11_000).contains(&n), "uneven: {n}");
    }
    // Buckets are the same for a key whatever the node count: the bucket is a function of the key alone.
    let m5 = map("shard-strategy,hash\nshard-count,5\nshard-algorithm,hash-buckets\n");
    for k in 0..1000i64 {
        assert_eq!(m4.locate(&KeyValue::Int(k)).unwrap().bucket, m5.locate(&KeyValue::Int(k)).unwrap().bucket);
    }
}

#[test]
fn tenant_from_database_session_key_and_hint() {
    let m = map("shard-strategy,tenant\nshard-tenant-db-prefix,gb_tenant_\nshard-node-a,postgres://u@h1/postgres\nshard-node-b,postgres://u@h2/postgres\n");
    let p = Planner::new(m.clone());
    let by_db = Session { database: Some("gb_tenant_acme".into()), ..Default::default() };
    let (node, j) = one(&p, "SELECT * FROM users", &by_db);
    assert_eq!(node, m.node(m.tenant_shard("acme")).name);
    assert_eq!(j["database"], "gb_tenant_acme");
    let by_set = Session { tenant: Some("globex".into()), ..Default::default() };
    let (_, j) = one(&p, "UPDATE users SET x = 1", &by_set);
    assert_eq!(j["database"], "gb_tenant_globex");
    let (_, j) = one(&p, "SELECT * FROM users WHERE tenant_id = 'initech'", &Session::default());
    assert_eq!(j["database"], "gb_tenant_initech");
    let (_, j) = one(&p, "/* tenant: hooli */ SELECT 1", &Session::default());
    assert_eq!(j["database"], "gb_tenant_hooli");
    let e = p.decide("SELECT * FROM users", &NoParams, &Session::default()).unwrap_err();
    assert!(matches!(e, RouteError::NoTenant { .. }), "{e}");
    assert_eq!(p.decide("BEGIN", &NoParams, &Session::default()).unwrap().target, Target::Session);
    let e = p.decide("SELECT * FROM users WHERE tenant_id IN ('a', 'b')", &NoParams, &by_db).unwrap_err();
    assert!(matches!(e, RouteError::SpansShards { .. }), "{e}");
    // The seed's three-line tenant config works alone (one implicit node).
    let p = Planner::new(map("shard-strategy,tenant\nshard-tenant-db-prefix,gb_tenant_\nshard-auto-create,true\n"));
    let (node, _) = one(&p, "SELECT 1 FROM t", &by_db);
    assert_eq!(node, "default");
}

/// Writes a small MaxMind database: 192.0.2.0/24 is Brazil (GeoLite2 Country layout, with continent),
/// 198.51.100.0/24 Germany, 203.0.113.0/24 Japan in the ip-location-db layout (`country_code` only).
fn write_mmdb(path: &std::path::Path) {
    use ipnet::IpNet;
    use mmdb_writer::Writer;
    #[derive(serde::Serialize)]
    struct Code {
        iso_code: String,
    }
    #[derive(serde::Serialize)]
    struct Cont {
        code: String,
    }
    #[derive(serde::Serialize)]
    struct Country {
        country: Code,
        continent: Cont,
    }
    #[derive(serde::Serialize)]
    struct Flat {
        country_code: String,
    }
    let mut w = Writer::new("Test-Country");
    let geo =
        |cc: &str, cont: &str| Country { country: Code { iso_code: cc.into() }, continent: Cont { code: cont.into() } };
    w.insert("192.0.2.0/24".parse::<IpNet>().unwrap(), &geo("BR", "SA")).unwrap();
    w.insert("198.51.100.0/24".parse::<IpNet>().unwrap(), &geo("DE", "EU")).unwrap();
    w.insert("203.0.113.0/24".parse::<IpNet>().unwrap(), &Flat { country_code: "JP".into() }).unwrap();
    w.insert("2001:db8::/32".parse::<IpNet>().unwrap(), &Flat { country_code: "us".into() }).unwrap();
    std::fs::write(path, w.to_bytes().unwrap()).unwrap();
}

#[test]
fn geo_by_region_country_and_ip() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("country.mmdb");
    write_mmdb(&db);
    let cfg = format!(
        "shard-strategy,geo\nshard-key,region\nshard-geo-us,postgres-us.example.com\nshard-geo-eu,postgres-eu.example.com\nshard-geo-asia,postgres-asia.example.com\nshard-default,postgres-us.example.com\nshard-geo-db,{}\nshard-geo-country-BR,us\n",
        db.display()
    );
    let p = Planner::new(map(&cfg));
    let s = Session::default();
    let route = |v: &str| {
        let (node, j) = one(&p, &format!("SELECT * FROM users WHERE region = '{v}'"), &s);
        (node, j["region"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(route("eu"), ("eu".into(), "eu".into()));
    assert_eq!(route("ASIA"), ("asia".into(), "asia".into()));
    assert_eq!(route("FR"), ("eu".into(), "eu".into()));
    assert_eq!(route("BR"), ("us".into(), "us".into()), "per-country override");
    assert_eq!(route("CA"), ("us".into(), "us".into()), "NA continent defaults to us");
    assert_eq!(route("192.0.2.10"), ("us".into(), "us".into()), "BR by IP, overridden to us");
    assert_eq!(route("198.51.100.7"), ("eu".into(), "eu".into()), "DE by IP");
    assert_eq!(route("203.0.113.1"), ("asia".into(), "asia".into()), "JP, ip-location-db layout");
    assert_eq!(route("2001:db8::1"), ("us".into(), "us".into()), "IPv6");
    assert_eq!(route("10.0.0.1"), ("us".into(), "default".into()), "unknown IP: shard-default (the us node)");
    assert_eq!(route("Atlantis"), ("us".into(), "default".into()));
    // A default on a host of its own is a node of its own.
    let p = Planner::new(map("shard-strategy,geo\nshard-geo-eu,eu-db:5433\nshard-default,postgres://u@fallback/db\n"));
    assert_eq!(one(&p, "SELECT * FROM t WHERE region = 'JP'", &s).0, "default");
    assert_eq!(one(&p, "SELECT * FROM t WHERE region = 'DE'", &s).0, "eu");
}

#[test]
fn hostile_input_has_a_bounded_cost() {
    let p = Planner::new(map("shard-strategy,hash\nshard-count,4\n"));
    let s = Session::default();
    // 10,000-element IN list.
    let list: Vec<String> = (0..10_000).map(|i| i.to_string()).collect();
    let sql = format!("SELECT * FROM users WHERE user_id IN ({})", list.join(","));
    let t = Instant::now();
    let d = p.decide(&sql, &NoParams, &s).unwrap();
    assert_eq!(d.target, Target::Set((0..4).map(ShardId).collect()));
    assert_eq!(d.values.len(), 10_000);
    let in_list = t.elapsed();
    // A 1 MB statement.
    let big = format!("SELECT * FROM users WHERE user_id = 5 AND note = '{}'", "x".repeat(1 << 20));
    let t = Instant::now();
    assert_eq!(p.decide(&big, &NoParams, &s).unwrap().target, Target::One(ShardId(1)));
    let mb = t.elapsed();
    // Deep nesting: a clear error, not a stack overflow.
    let deep = format!("SELECT * FROM users WHERE user_id = {}1{}", "(".repeat(5000), ")".repeat(5000));
    let e = p.decide(&deep, &NoParams, &s).unwrap_err();
    assert!(e.to_string().contains("recursion limit"), "{e}");
    let deep_q = format!("SELECT * FROM users WHERE user_id IN {}SELECT 1{}", "(".repeat(2000), ")".repeat(2000));
    assert!(p.decide(&deep_q, &NoParams, &s).is_err());
    // Bounds generous enough for a loaded 2-core machine in a debug build; the point is "not minutes".
    assert!(in_list < Duration::from_secs(5) && mb < Duration::from_secs(5), "{in_list:?} {mb:?}");
    eprintln!("10k IN list: {in_list:?}, 1 MB statement: {mb:?}");
}

#[test]
fn cached_and_uncached_decisions_agree() {
    let p = Planner::new(map("shard-strategy,hash\nshard-count,4\n"));
    let sql = "SELECT * FROM users WHERE user_id = $1";
    let a = p.analyze(sql);
    assert!(Arc::ptr_eq(&a, &p.analyze(sql)), "the second analysis comes from the cache");
    for k in 0..100 {
        let params = TextParams(vec![Some(k.to_string())]);
        let d = p.decide(sql, &params, &Session::default()).unwrap();
        assert_eq!(d.target, Target::One(ShardId((k % 4) as u16)));
    }
}

fn strategies() -> impl Strategy<Value = Arc<ShardMap>> {
    prop_oneof![
        (1u32..16).prop_map(|n| map(&format!("shard-strategy,hash\nshard-count,{n}\n"))),
        (1u32..16, 16u32..2048).prop_map(|(n, b)| map(&format!(
            "shard-strategy,hash\nshard-count,{n}\nshard-algorithm,hash-buckets\nshard-buckets,{b}\n"
        ))),
    ]
}

proptest! {
    #[test]
    fn every_key_lands_on_exactly_one_shard(m in strategies(), k in any::<i64>(), s in "[a-z0-9]{0,20}", u in any::<[u8; 16]>()) {
        for v in [KeyValue::Int(k), KeyValue::Text(s.clone().into()), KeyValue::Uuid(u)] {
            let a = m.locate(&v).unwrap();
            let b = m.locate(&v).unwrap();
            prop_assert_eq!(&a, &b);
            prop_assert!((a.shard.0 as usize) < m.nodes.len());
            if let Some(n) = m.bucket_count() {
                prop_assert!(a.bucket.unwrap().0 < n);
            }
        }
    }

    #[test]
    fn modulo_is_the_remainder(n in 1u32..64, k in 0i64..i64::MAX) {
        let m = map(&format!("shard-strategy,hash\nshard-count,{n}\n"));
        prop_assert_eq!(m.locate(&KeyValue::Int(k)).unwrap().shard.0 as i64, k % n as i64);
    }

    #[test]
    fn ranges_honour_their_bounds(bounds in proptest::collection::btree_set(1i64..1_000_000, 1..6), k in -10i64..1_100_000, open in any::<bool>()) {
        let bounds: Vec<i64> = bounds.into_iter().collect();
        let mut parts = Vec::new();
        let mut start = 0i64;
        for (i, b) in bounds.iter().enumerate() {
            parts.push(format!("{start}-{}:n{i}", b - 1));
            start = *b;
        }
        if open {
            parts.push(format!("{start}-:last"));
        }
        let m = map(&format!("shard-strategy,range\nshard-ranges,{}\n", parts.join(",")));
        let got = m.locate(&KeyValue::Int(k));
        let mut lo = 0i64;
        let mut want = None;
        for (i, b) in bounds.iter().enumerate() {
            if (lo..*b).contains(&k) { want = Some(format!("n{i}")); }
            lo = *b;
        }
        if open && k >= lo { want = Some("last".into()); }
        match (got, want) {
            (Ok(l), Some(w)) => prop_assert_eq!(&m.node(l.shard).name, &w),
            (Err(_), None) => {}
            (g, w) => prop_assert!(false, "key {} got {:?} want {:?}", k, g, w),
        }
    }

    #[test]
    fn geo_always_places_with_a_default(v in "[A-Za-z]{2}|[0-9.]{7,15}|[a-z]{3,8}") {
        let m = map("shard-strategy,geo\nshard-geo-us,h1\nshard-geo-eu,h2\nshard-default,h1\n");
        let l = m.locate(&KeyValue::Text(v.into())).unwrap();
        prop_assert!(l.shard.0 < 2);
    }

    #[test]
    fn parameter_and_literal_agree(k in any::<i64>()) {
        let p = Planner::new(map("shard-strategy,hash\nshard-count,7\nshard-algorithm,hash-buckets\n"));
        let lit = p.decide(&format!("SELECT * FROM users WHERE user_id = {k}"), &NoParams, &Session::default()).unwrap();
        let par = p.decide("SELECT * FROM users WHERE user_id = $1", &TextParams(vec![Some(k.to_string())]), &Session::default()).unwrap();
        let simple = p.decide_simple(&format!("SELECT * FROM users WHERE user_id = {k}"), &Session::default()).unwrap();
        prop_assert_eq!(&lit.target, &simple.target);
        prop_assert_eq!(&lit.buckets, &simple.buckets);
        prop_assert_eq!(lit.target, par.target);
        prop_assert_eq!(lit.buckets, par.buckets);
    }
}

#[test]
fn one_shard_every_shard_is_that_shard() {
    let p = Planner::new(map("shard-strategy,hash\nshard-count,1\nshard-global-tables,tellers\n"));
    for sql in ["UPDATE tellers SET n = n + 1 WHERE tid = 3", "CREATE TABLE t (user_id bigint)", "SELECT * FROM users"]
    {
        assert_eq!(p.decide(sql, &NoParams, &Session::default()).unwrap().target, Target::One(ShardId(0)), "{sql}");
    }
}
