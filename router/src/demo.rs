//! `shard-router demo`: four local PostgreSQL shards in a temporary directory, a hash-sharded config (written
//! where `--config-file` says, `./shard-router-demo.csv` by default, for `explain` and `rebalance`), the
//! router in front, a `psql` line and an example session to try; Ctrl-C (or SIGTERM) stops the shards and
//! removes their data and the config file.

use std::io::Write;

use anyhow::Context;
use shardmap::Config;
use tokio::net::TcpListener;

use localpg::PgServer;

/// Runs the demo until Ctrl-C (or until `shutdown` resolves, for tests); its config is written to
/// `config_path`.
pub async fn run(
    shards: usize,
    listen: &str,
    config_path: &std::path::Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let bin = localpg::pg_bin()
        .context("the demo needs PostgreSQL's server binaries (Debian: apt-get install postgresql)")?;
    eprintln!("starting {shards} PostgreSQL shards from {} ...", bin.display());
    let mut servers = Vec::with_capacity(shards);
    for i in 0..shards {
        // Logical decoding: `rebalance move` copies a unit's rows with logical replication.
        let s = tokio::task::spawn_blocking(|| PgServer::start_with(&["wal_level=logical"]))
            .await?
            .with_context(|| format!("starting shard {i}"))?;
        servers.push(s);
    }
    let mut config = format!(
        "# shard-router demo: {shards} hash shards keyed by user_id\n\
         shard-strategy,hash\nshard-count,{shards}\nshard-key,user_id\nshard-algorithm,hash-buckets\n\
         shard-global-tables,bots\nrouter-auth,trust\n"
    );
    for (i, s) in servers.iter().enumerate() {
        config.push_str(&format!("shard-node-{i},{}\n", s.url("postgres")));
    }
    std::fs::write(config_path, &config).with_context(|| format!("writing {}", config_path.display()))?;
    // The file goes with the shards, whatever happens after this.
    struct Remove<'a>(&'a std::path::Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _remove = Remove(config_path);
    let parsed = Config::parse(&config_path.display().to_string(), config.as_bytes())?;
    let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let conn = format!("host={} port={} user=postgres dbname=postgres", addr.ip(), addr.port());
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "shard-router demo: {shards} shards, config {cfg}\n\
         listening on {addr}\n\n\
         Connect:   psql \"{conn}\"\n\n\
         Try:\n\
         \x20 CREATE TABLE users (user_id bigint PRIMARY KEY, name text);\n\
         \x20 INSERT INTO users (user_id, name) VALUES (1, 'ana');\n\
         \x20 INSERT INTO users (user_id, name) VALUES (2, 'bo');\n\
         \x20 SELECT * FROM users WHERE user_id = 1;   -- one shard\n\
         \x20 SELECT * FROM users;                     -- every shard\n\
         \x20 and see where a statement goes: shard-router explain --config {cfg} \"SELECT * FROM users WHERE user_id = 1\"\n\n\
         Ctrl-C stops the shards and removes their data.",
        cfg = config_path.display()
    )?;
    drop(out);
    crate::server::run(listener, parsed, shutdown).await?;
    eprintln!("stopping the shards and removing their data ...");
    drop(servers);
    Ok(())
}
