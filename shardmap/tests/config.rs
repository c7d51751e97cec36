//! config.csv: the seed document's keys as written, and errors that name the file, the line and the key.

use shardmap::config::{Algorithm, AuthMethod, PoolMode};
use shardmap::{Config, ConfigError, Strategy};

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse("config.csv", text.as_bytes())
}

fn err(text: &str) -> String {
    parse(text).expect_err("must be refused").to_string()
}

#[test]
fn seed_document_examples_work_as_written() {
    let c =
        parse("# Tenant sharding\nshard-strategy,tenant\nshard-tenant-db-prefix,gb_tenant_\nshard-auto-create,true\n")
            .unwrap();
    assert_eq!((c.strategy, c.tenant_db_prefix.as_str(), c.auto_create), (Strategy::Tenant, "gb_tenant_", true));

    let c = parse("# Hash sharding\nshard-strategy,hash\nshard-count,4\nshard-key,user_id\nshard-algorithm,modulo\n")
        .unwrap();
    assert_eq!(
        (c.strategy, c.shard_count, c.shard_key.as_str(), c.algorithm),
        (Strategy::Hash, Some(4), "user_id", Algorithm::Modulo)
    );

    let c = parse(
        "# Range sharding\nshard-strategy,range\nshard-ranges,0-999999:shard1,1000000-1999999:shard2,2000000-:shard3\n",
    )
    .unwrap();
    assert_eq!(c.ranges.len(), 3);
    assert_eq!(c.ranges[2].end, None);

    let c = parse(
        "# Geographic sharding\nshard-strategy,geo\nshard-geo-us,postgres-us.example.com\nshard-geo-eu,postgres-eu.example.com\nshard-geo-asia,postgres-asia.example.com\nshard-default,postgres-us.example.com\n",
    )
    .unwrap();
    assert_eq!(c.geo_regions.len(), 3);

    let c = parse("shard-strategy,hash\nshard-count,2\nhealth-enabled,true\nhealth-endpoint,/api/health\nhealth-interval,10\nhealth-timeout,5\nhealth-retries,3\ncircuit-breaker-enabled,true\ncircuit-breaker-threshold,5\ncircuit-breaker-timeout,30\ncircuit-breaker-half-open-requests,3\n").unwrap();
    assert!(c.health.enabled && c.circuit_breaker.enabled);
    assert_eq!(c.circuit_breaker.half_open_requests, 3);
}

#[test]
fn botserver_keys_are_ignored() {
    let c = parse(
        "scale-enabled,true\nscale-min-instances,1\nrate-limit-requests,100\nllm-model,x,y\nqdrant-shard-count,4\ncache-nodes,redis-1:6379,redis-2:6379\nshard-strategy,hash\nshard-count,2\n",
    )
    .unwrap();
    assert_eq!(c.shard_count, Some(2));
}

#[test]
fn quoted_values_and_commas() {
    let c = parse(
        "shard-strategy,range\n\"shard-ranges\",\"0-9:a,10-:b\"\nshard-global-tables,bots, tools ,system_config\n",
    )
    .unwrap();
    assert_eq!(c.ranges.len(), 2);
    assert_eq!(c.global_tables, vec!["bots", "tools", "system_config"]);
    let c =
        parse("shard-strategy,tenant\nshard-node-a,\"postgres://u:p%40ss@h1:5433,h2/db?sslmode=disable\"\n").unwrap();
    let a = &c.nodes[0].1;
    assert_eq!(a.hosts, vec![("h1".to_string(), 5433), ("h2".to_string(), 5432)]);
    assert_eq!((a.user.as_deref(), a.password.as_deref(), a.dbname.as_deref()), (Some("u"), Some("p@ss"), Some("db")));
    assert_eq!(a.params, vec![("sslmode".to_string(), "disable".to_string())]);
}

#[test]
fn router_and_pool_settings() {
    let c = parse("shard-strategy,hash\nshard-count,1\nrouter-listen,0.0.0.0:7000\nrouter-auth,md5\nrouter-user-bot,secret\npool-mode,session\npool-size,7\npool-timeout-ms,250\npool-idle-timeout,60\nrouter-admin-users,admin,ops\n").unwrap();
    assert_eq!(c.router.listen, "0.0.0.0:7000");
    assert_eq!(c.router.auth, AuthMethod::Md5);
    assert_eq!(c.router.users.get("bot").map(String::as_str), Some("secret"));
    assert_eq!((c.pool.mode, c.pool.size, c.pool.timeout_ms, c.pool.idle_timeout_s), (PoolMode::Session, 7, 250, 60));
    assert_eq!(c.router.admin_users, vec!["admin", "ops"]);
    let d = parse("shard-strategy,hash\nshard-count,1\n").unwrap();
    assert_eq!(
        (d.router.listen.as_str(), d.router.auth, d.pool.mode, d.pool.size),
        ("127.0.0.1:6432", AuthMethod::ScramSha256, PoolMode::Transaction, 20)
    );
}

#[test]
fn errors_name_file_line_key_and_expectation() {
    assert_eq!(
        err("# c\nshard-strategy,hash\nshard-count,four\n"),
        "config.csv:3: shard-count: expected a whole number of at least 1, got \"four\""
    );
    assert_eq!(
        err("shard-strategy,hashed\n"),
        "config.csv:1: shard-strategy: expected tenant, hash, range or geo, got \"hashed\""
    );
    assert_eq!(
        err("shard-strategy,hash\nshard-count,4\n\nshard-algoritm,modulo\n"),
        "config.csv:4: shard-algoritm: unknown key; did you mean shard-algorithm?"
    );
    assert_eq!(
        err("shard-strategy,hash\nshard-count,4\npool-sise,3\n"),
        "config.csv:3: pool-sise: unknown key; did you mean pool-size?"
    );
    assert_eq!(
        err("shard-strategy,hash\nshard-count,4\nhealth-intervall,3\n"),
        "config.csv:3: health-intervall: unknown key; did you mean health-interval?"
    );
    assert!(err("shard-strategy,hash\nshard-count,4\nrouter-frobnicate,3\n")
        .starts_with("config.csv:3: router-frobnicate: unknown key"));
    assert_eq!(
        err("shard-strategy,hash\nshard-count,4\nshard-count,5\n"),
        "config.csv:3: shard-count: set twice (first on line 2)"
    );
    assert_eq!(err("shard-strategy,hash\n"), "config.csv:1: shard-strategy: the hash strategy needs shard-count");
    assert_eq!(err("shard-count,3\n"), "config.csv: shard-strategy is missing (expected tenant, hash, range or geo)");
    assert_eq!(
        err("shard-strategy,hash\nshard-count,2\nshard-auto-create,maybe\n"),
        "config.csv:3: shard-auto-create: expected true or false, got \"maybe\""
    );
    assert_eq!(
        err("shard-strategy,hash\nshard-count,2\nshard-node-0,localhost:5432\n"),
        "config.csv:3: shard-node-0: expected postgres://user:password@host:port/dbname, got \"localhost:5432\""
    );
    assert_eq!(
        err("shard-strategy,hash\nshard-count,2\nshard-node-5,postgres://h/db\n"),
        "config.csv:3: shard-node-5: no such node: hash nodes are named 0 to 1"
    );
    assert_eq!(
        err("shard-strategy,geo\nshard-geo-country-XX,us\n"),
        "config.csv:2: shard-geo-country-XX: \"XX\" is not an ISO 3166 country code"
    );
}

#[test]
fn ranges_refuse_gaps_overlaps_and_bad_rows() {
    let e = err("shard-strategy,range\nshard-ranges,0-99:a,150-:b\n");
    assert_eq!(e, "config.csv:2: shard-ranges: \"150-:b\": leaves a gap after 0-99:a (next should start at 100) (expected start-end:name or start-:name)");
    let e = err("shard-strategy,range\nshard-ranges,0-99:a,50-:b\n");
    assert!(e.contains("overlaps 0-99:a"), "{e}");
    let e = err("shard-strategy,range\nshard-ranges,0-:a,100-:b\n");
    assert!(e.contains("comes after an open range"), "{e}");
    let e = err("shard-strategy,range\nshard-ranges,10-5:a\n");
    assert!(e.contains("the end is below the start"), "{e}");
    let e = err("shard-strategy,range\nshard-ranges,0-99\n");
    assert!(e.contains("no ':name'"), "{e}");
    let e = err("shard-strategy,range\nshard-ranges,x-99:a\n");
    assert!(e.contains("the start is not a whole number"), "{e}");
    assert!(err("shard-strategy,range\n").contains("needs shard-ranges"));
}

#[test]
fn reading_from_a_file_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.csv");
    std::fs::write(&path, "shard-strategy,hash\nshard-count,x\n").unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}:2: shard-count", path.display())), "{e}");
    let e = Config::load(&dir.path().join("missing.csv")).unwrap_err().to_string();
    assert!(e.contains("missing.csv"), "{e}");
}

#[test]
fn router_threads() {
    assert_eq!(parse("shard-strategy,hash\nshard-count,1\n").unwrap().router.threads, 0);
    assert_eq!(parse("shard-strategy,hash\nshard-count,1\nrouter-threads,1\n").unwrap().router.threads, 1);
    assert!(err("shard-strategy,hash\nshard-count,1\nrouter-threads,many\n")
        .starts_with("config.csv:3: router-threads: expected a whole number"));
}

#[test]
fn each_table_its_own_key_column() {
    let c = parse("shard-strategy,hash\nshard-count,2\nshard-table-Users,ID\nshard-table-session_tools,session_id\n")
        .unwrap();
    assert_eq!(c.table_keys.get("users").map(String::as_str), Some("id"));
    assert_eq!(c.table_keys.get("session_tools").map(String::as_str), Some("session_id"));
    assert_eq!(
        err("shard-strategy,hash\nshard-count,2\nshard-table-users,id;drop\n"),
        "config.csv:3: shard-table-users: expected the shard key column of table users, got \"id;drop\""
    );
    let e = err("shard-strategy,hash\nshard-count,2\nshard-global-tables,bots\nshard-table-bots,id\n");
    assert!(e.contains("bots is global and has a shard-table-bots key"), "{e}");
}

#[test]
fn client_limits_and_two_phase_commit() {
    let base = "shard-strategy,hash\nshard-count,2\n";
    let c = parse(base).unwrap();
    assert_eq!((c.router.limits.max_clients, c.router.limits.client_idle_timeout_s), (10_000, 0));
    assert!(c.two_phase_commit);
    let c = parse(&format!(
        "{base}router-max-clients,50\nrouter-max-clients-per-user,5\nrouter-startup-timeout-ms,2000\n\
         router-max-message-bytes,1048576\nrouter-max-client-buffer-bytes,4194304\nrouter-client-idle-timeout-s,300\n\
         router-idle-transaction-timeout-s,60\nshard-two-phase-commit,false\n"
    ))
    .unwrap();
    let l = &c.router.limits;
    assert_eq!(
        (l.max_clients, l.max_clients_per_user, l.startup_timeout_ms, l.max_message_bytes),
        (50, 5, 2000, 1 << 20)
    );
    assert_eq!((l.max_client_buffer_bytes, l.client_idle_timeout_s, l.idle_transaction_timeout_s), (4 << 20, 300, 60));
    assert!(!c.two_phase_commit);
    let e = err(&format!("{base}router-max-message-bytes,2000000000\n"));
    assert!(e.contains("config.csv:3") && e.contains("router-max-message-bytes") && e.contains("1073741824"), "{e}");
    let e = err(&format!("{base}router-max-clients,0\n"));
    assert!(e.contains("router-max-clients"), "{e}");
}

#[test]
fn node_passwords_from_a_file_or_the_environment() {
    let dir = std::env::temp_dir().join(format!("gb-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pw");
    std::fs::write(&file, "from-file\n").unwrap();
    std::env::set_var("GB_CONFIG_TEST_NODE1_PW", "from-env");
    let text = format!(
        "shard-strategy,hash\nshard-count,2\nshard-node-0-password-file,{}\nshard-node-0,postgres://gb@h0/db\n\
         shard-node-1,postgres://gb@h1/db\nshard-node-1-password-env,GB_CONFIG_TEST_NODE1_PW\n",
        file.display()
    );
    let c = parse(&text).unwrap();
    let pw = |n: &str| c.nodes.iter().find(|(name, _)| name == n).unwrap().1.password.clone();
    assert_eq!((pw("0").as_deref(), pw("1").as_deref()), (Some("from-file"), Some("from-env")));
    let e = err("shard-strategy,hash\nshard-count,1\nshard-node-0,postgres://h/db\nshard-node-0-password-env,GB_CONFIG_TEST_UNSET\n");
    assert!(e.contains("shard-node-0-password-env") && e.contains("GB_CONFIG_TEST_UNSET"), "{e}");
    let e = err("shard-strategy,hash\nshard-count,1\nshard-node-0,postgres://h/db\nshard-node-7-password-file,/x\n");
    assert!(e.contains("no shard-node-7 key"), "{e}");
    let e = err(&format!(
        "shard-strategy,hash\nshard-count,1\nshard-node-0,postgres://h/db\nshard-node-0-password-file,{}\n",
        dir.join("missing").display()
    ));
    assert!(e.contains("cannot read"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn users_limited_to_tenants() {
    let c = parse("shard-strategy,tenant\nrouter-user-mallory,pw\nrouter-user-mallory-tenants,acme, beta\n").unwrap();
    assert_eq!(c.router.user_tenants["mallory"], ["acme", "beta"]);
    assert_eq!(c.router.users["mallory"], "pw");
    let e = err("shard-strategy,hash\nshard-count,1\nrouter-user-mallory-tenants,acme\n");
    assert!(e.contains("needs shard-strategy,tenant"), "{e}");
}

#[test]
fn patroni_over_https_needs_its_ca() {
    let base =
        "shard-strategy,hash\nshard-count,1\nshard-node-0,postgres://h/db\nshard-node-0-patroni,https://h:8008\n";
    let e = err(base);
    assert!(e.contains("patroni-ca-file"), "{e}");
    let c = parse(&format!("{base}patroni-ca-file,/etc/patroni/ca.pem\n")).unwrap();
    assert_eq!(c.failover.patroni_ca_file.as_deref(), Some(std::path::Path::new("/etc/patroni/ca.pem")));
}

/// Every key config.csv takes is documented in docs/configuration.md (the users' interface).
#[test]
fn every_key_is_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md"))
        .expect("docs/configuration.md");
    let missing: Vec<&&str> = shardmap::config::KEYS.iter().filter(|k| !doc.contains(&format!("`{k}`"))).collect();
    assert!(missing.is_empty(), "keys not in docs/configuration.md: {missing:?}");
}
