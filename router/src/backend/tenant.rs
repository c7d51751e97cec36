//! Tenant databases (`shard-strategy,tenant`). With `shard-auto-create,true` a tenant's database that does
//! not exist yet is created on first use, on the node the placement rule picks (the hash of the tenant's
//! name over the nodes), from `<prefix>template` when that database exists so that it comes with the
//! schema. This is control-plane work, done with tokio-postgres on the node's own database.

use shardmap::ShardId;

use crate::backend::Backends;
use crate::net::Reported;

use shardmap::sql::quote_ident;

/// Creates `database` on `shard`'s node. Another client or router creating it at the same time is not an
/// error: the database exists either way.
pub async fn create(backends: &Backends, shard: ShardId, database: &str) -> Result<(), Reported> {
    let node = backends.map.node(shard);
    let addr =
        node.addr.as_ref().ok_or_else(|| Reported::new("08001", format!("shard {} has no address", node.name)))?;
    let (host, port) = addr.hosts[0].clone();
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&host).port(port).dbname(addr.dbname.as_deref().unwrap_or("postgres"));
    cfg.user(addr.user.as_deref().unwrap_or("postgres"));
    if let Some(p) = &addr.password {
        cfg.password(p);
    }
    cfg.connect_timeout(std::time::Duration::from_millis(backends.config.load().pool.timeout_ms));
    let tls = shard_catalog::tls::connector(&mut cfg, &addr.params)
        .map_err(|e| Reported::new("08001", format!("shard {}: {e}", node.name)))?;
    let _one_at_a_time = backends.creating.lock().await;
    let (db, conn) = cfg.connect(tls).await.map_err(|e| Reported::new("08001", format!("shard {}: {e}", node.name)))?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let template = format!("{}template", backends.map.tenant_prefix);
    let has_template = db
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&template])
        .await
        .map_err(|e| Reported::new("58000", e.to_string()))?
        .is_some();
    let sql = if has_template {
        format!("CREATE DATABASE {} TEMPLATE {}", quote_ident(database), quote_ident(&template))
    } else {
        format!("CREATE DATABASE {}", quote_ident(database))
    };
    let mut result = Ok(());
    for attempt in 0..20 {
        match db.batch_execute(&sql).await {
            Ok(()) => break,
            Err(e) => match e.as_db_error().map(|d| d.code().code()) {
                Some("42P04") => break, // created by someone else meanwhile
                // The template is busy (another router copying it): wait a little and try again.
                Some("55006") if attempt < 19 => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                _ => {
                    result = Err(Reported::new(
                        e.as_db_error().map_or("58000", |d| d.code().code()),
                        format!("creating tenant database {database} on shard {}: {e}", node.name),
                    ));
                    break;
                }
            },
        }
    }
    drop(db);
    let _ = task.await;
    if result.is_ok() {
        tracing::info!(database, shard = %node.name, template = has_template, "created tenant database");
    }
    result
}
