//! `shard-router explain` and `check` through the real binary, on the README's example configs.

use std::process::Command;

fn explain(config: &str, args: &[&str]) -> (i32, serde_json::Value) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new(env!("CARGO_BIN_EXE_shard-router"))
        .current_dir(root)
        .args(["explain", "--config", config])
        .args(args)
        .output()
        .expect("run shard-router");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let json = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout:?} {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap(), json)
}

#[test]
fn readme_hash_example() {
    let (code, j) = explain("examples/hash.csv", &["SELECT * FROM users WHERE user_id = 12345"]);
    assert_eq!(code, 0);
    assert_eq!(
        j.to_string(),
        r#"{"strategy":"hash","key":"user_id","values":["12345"],"shards":["1"],"target":"one","reason":"user_id = 12345","source":"config"}"#
    );
    let (_, j) = explain("examples/hash.csv", &["--param", "7", "UPDATE users SET name = 'x' WHERE user_id = $1"]);
    assert_eq!(j["shards"][0], "3");
    let (code, j) = explain("examples/hash.csv", &["DELETE FROM message_history"]);
    assert_eq!(code, 1);
    assert!(j["error"].as_str().unwrap().contains("needs the shard key user_id"), "{j}");
    assert_eq!(j["sqlstate"], "42000");
    let (_, j) = explain("examples/hash.csv", &["--shard-key", "6", "DELETE FROM message_history"]);
    assert_eq!(j["shards"][0], "2");
}

#[test]
fn readme_bucket_range_and_tenant_examples() {
    let (_, j) = explain(
        "examples/buckets.csv",
        &["SELECT * FROM users WHERE user_id = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"],
    );
    let bucket = j["bucket"].as_u64().unwrap();
    assert_eq!(j["shards"][0].as_str().unwrap(), (bucket % 4).to_string());
    let (_, j) = explain("examples/range.csv", &["SELECT * FROM users WHERE user_id = 1500000"]);
    assert_eq!(j["shards"][0], "shard2");
    let (_, j) = explain("examples/tenant.csv", &["--database", "gb_tenant_acme", "SELECT * FROM users"]);
    assert_eq!(j["database"], "gb_tenant_acme");
    let (_, j) = explain("examples/tenant.csv", &["--tenant", "globex", "SELECT * FROM users"]);
    assert_eq!(j["database"], "gb_tenant_globex");
}

#[test]
fn bad_config_exits_2_with_the_line() {
    let dir = std::env::temp_dir().join(format!("sr-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.csv");
    std::fs::write(&path, "shard-strategy,hash\nshard-count,4\nshard-algoritm,modulo\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shard-router"))
        .args(["explain", "--config", path.to_str().unwrap(), "SELECT 1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.csv:3: shard-algoritm: unknown key; did you mean shard-algorithm?"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_shard-router"))
        .args(["check", "--config", "examples/hash.csv"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["nodes"][1]["address"], "postgres://gb@10.0.0.11:5432/botserver", "no password printed");
    std::fs::remove_dir_all(&dir).ok();
}

/// `shard-router demo`: shards start, psql works through the router, Ctrl-C removes everything.
#[test]
fn demo_starts_serves_and_cleans_up() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("demo.csv");
    let mut child = Command::new(env!("CARGO_BIN_EXE_shard-router"))
        .args(["demo", "--shards", "2", "--listen", "127.0.0.1:0", "--config-file", file.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut conn = None;
    let mut config = None;
    let mut line = String::new();
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(120) {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(c) = line.trim().strip_prefix("Connect:   psql ") {
            conn = Some(c.trim_matches('"').to_string());
            break;
        }
        if let Some(rest) = line.strip_prefix("shard-router demo: 2 shards, config ") {
            config = Some(rest.trim().to_string());
        }
    }
    let conn = conn.expect("the demo prints a psql line");
    let config = std::path::PathBuf::from(config.expect("the demo prints its config path"));
    assert_eq!(config, file);
    assert!(config.exists());
    let psql = Command::new("psql")
        .args([&conn, "-X", "-A", "-t", "-q", "-c", "CREATE TABLE users (user_id bigint PRIMARY KEY, name text)"])
        .args([
            "-c",
            "INSERT INTO users (user_id, name) VALUES (1, 'ana')",
            "-c",
            "SELECT name FROM users WHERE user_id = 1",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&psql.stdout).trim(), "ana", "{}", String::from_utf8_lossy(&psql.stderr));
    // Ctrl-C.
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success());
    assert!(!config.exists(), "the demo's config is removed");
}

/// `shard-router serve` on a single event loop (`router-threads,1`) serves psql.
#[test]
fn serve_on_one_thread() {
    let pg = localpg::PgServer::start().expect("a local PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.csv");
    std::fs::write(
        &config,
        format!(
            "shard-strategy,hash\nshard-count,1\nrouter-auth,trust\nrouter-threads,1\nshard-node-0,{}\n",
            pg.url("postgres")
        ),
    )
    .unwrap();
    let port = localpg::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shard-router"))
        .args(["serve", "--config", config.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let conn = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let mut out = String::new();
    for _ in 0..50 {
        let o = Command::new("psql").args([&conn, "-X", "-A", "-t", "-c", "SELECT 6 * 7"]).output().unwrap();
        out = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if out == "42" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(out, "42");
}

#[test]
fn reads_across_shards_say_how_rows_are_combined() {
    let (code, j) = explain("examples/hash.csv", &["SELECT * FROM message_history WHERE role = 'user'"]);
    assert_eq!((code, j["rows"].as_str()), (0, Some("concatenated")), "{j}");
    let (code, j) =
        explain("examples/hash.csv", &["SELECT role, count(*) FROM message_history GROUP BY role ORDER BY 2 DESC"]);
    assert_eq!((code, j["rows"].as_str()), (0, Some("combined")), "{j}");
    assert_eq!(j["shard_sql"], "SELECT role, count(*) FROM message_history GROUP BY 1");
    let (_, j) = explain("examples/hash.csv", &["SELECT * FROM message_history ORDER BY created_at"]);
    assert!(j["merge"].as_str().unwrap().starts_with("merged as they come"), "{j}");
    let (code, j) = explain("examples/hash.csv", &["SELECT string_agg(content, ',') FROM message_history"]);
    assert_eq!((code, j["sqlstate"].as_str()), (1, Some("0A000")), "{j}");
    assert!(j["error"].as_str().unwrap().contains("string_agg()"), "{j}");
}

#[test]
fn explain_says_which_map_it_used() {
    // A strategy whose units move (ranges): the catalog is read unless --offline; one that cannot be reached
    // leaves config.csv's answer, with a warning and the reason in the JSON.
    let (code, j) = explain("examples/range.csv", &["--offline", "SELECT * FROM users WHERE user_id = 1500000"]);
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["source"], "config");
    assert_eq!(j["catalog"], "not read (--offline)");
    let (code, j) = explain("examples/range.csv", &["SELECT * FROM users WHERE user_id = 1500000"]);
    assert_eq!(code, 0, "{j}");
    assert_eq!((j["source"].as_str(), j["shards"].clone()), (Some("config"), serde_json::json!(["shard2"])));
    assert!(j["catalog"].as_str().is_some_and(|c| c.starts_with("unreachable")), "{j}");
    // Modulo hashing has no catalog: nothing to read.
    let (_, j) = explain("examples/hash.csv", &["SELECT * FROM users WHERE user_id = 12345"]);
    assert_eq!(j["source"], "config");
    assert!(j.get("catalog").is_none(), "{j}");
}
