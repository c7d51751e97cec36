//! config.csv, General Bots' format: one `name,value` row a line, `#` comments, blank lines, values that may
//! hold commas or be quoted as CSV quotes them. Read once into typed settings; every error names the file,
//! the line, the key and what was expected. Keys outside this project's prefixes (botserver's `scale-*`,
//! `llm-*`, ...) are ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::value::KeyType;

/// The prefixes this project owns: an unknown key under one of them is an error.
pub const PREFIXES: &[&str] =
    &["shard-", "router-", "pool-", "circuit-breaker-", "health-", "patroni-", "failover-", "rebalance-"];

/// Every fixed key, for "did you mean" (dynamic keys are listed by their pattern).
pub const KEYS: &[&str] = &[
    "shard-strategy",
    "shard-tenant-db-prefix",
    "shard-auto-create",
    "shard-count",
    "shard-key",
    "shard-key-type",
    "shard-algorithm",
    "shard-buckets",
    "shard-ranges",
    "shard-default",
    "shard-geo-db",
    "shard-global-tables",
    "shard-table-<table>",
    "shard-read-replicas",
    "shard-max-replica-lag-bytes",
    "shard-replica-policy",
    "shard-degraded-reads",
    "shard-catalog",
    "shard-two-phase-commit",
    "shard-node-<name>",
    "shard-node-<name>-patroni",
    "shard-node-<name>-password-file",
    "shard-node-<name>-password-env",
    "shard-geo-<region>",
    "shard-geo-country-<CC>",
    "shard-geo-continent-<CC>",
    "router-listen",
    "router-auth",
    "router-user-<name>",
    "router-user-<name>-tenants",
    "router-tls-cert",
    "router-tls-key",
    "router-http",
    "router-admin-users",
    "router-threads",
    "router-max-clients",
    "router-max-clients-per-user",
    "router-max-clients-per-tenant",
    "router-startup-timeout-ms",
    "router-max-message-bytes",
    "router-max-client-buffer-bytes",
    "router-client-idle-timeout-s",
    "router-idle-transaction-timeout-s",
    "router-shutdown-timeout-s",
    "router-rate-limit-statements",
    "router-rate-limit-window-s",
    "router-rate-limit-burst",
    "pool-mode",
    "pool-size",
    "pool-timeout-ms",
    "pool-idle-timeout",
    "health-enabled",
    "health-endpoint",
    "health-interval",
    "health-timeout",
    "health-retries",
    "circuit-breaker-enabled",
    "circuit-breaker-threshold",
    "circuit-breaker-timeout",
    "circuit-breaker-half-open-requests",
    "patroni-interval-ms",
    "patroni-ca-file",
    "failover-buffer-window-ms",
    "failover-buffer-size",
    "failover-buffer-max-ms",
    "rebalance-cutover-lag-bytes",
    "rebalance-max-freeze-ms",
    "rebalance-grace-s",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Io { file: String, source: std::io::Error },
    #[error("{file}:{line}: {key}: {message}")]
    Key { file: String, line: u64, key: String, message: String },
    #[error("{file}: {message}")]
    File { file: String, message: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Tenant,
    Hash,
    Range,
    Geo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    #[default]
    Modulo,
    HashBuckets,
}

/// `shard-replica-policy`: which fresh-enough standby takes a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaPolicy {
    /// Each standby in turn.
    #[default]
    RoundRobin,
    /// The standby whose pool has the fewest connections checked out now.
    LeastConn,
    /// A standby drawn at random.
    Random,
    /// The first standby in the node's order (its URL's hosts, or Patroni's member list), the others only
    /// when it lags or is down.
    First,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PoolMode {
    #[default]
    Transaction,
    Session,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    Md5,
    Trust,
}

/// A PostgreSQL server address: `postgres://user:password@host:port[,host:port...]/dbname?params`, or a bare
/// `host` / `host:port` (geo values), whose user and database then come from the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeAddr {
    pub hosts: Vec<(String, u16)>,
    pub user: Option<String>,
    #[serde(skip_serializing)]
    pub password: Option<String>,
    pub dbname: Option<String>,
    pub params: Vec<(String, String)>,
}

/// Where a node's password is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PasswordFrom {
    File(PathBuf),
    Env(String),
}

/// One row of `shard-ranges`: `start-end:name` (both bounds inclusive) or `start-:name` (open).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RangeSpec {
    pub start: i64,
    pub end: Option<i64>,
    pub node: String,
}

/// The settings of config.csv, typed and validated. Values keep the line they came from for later errors.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub file: String,
    pub strategy: Strategy,
    pub tenant_db_prefix: String,
    pub auto_create: bool,
    pub shard_count: Option<u32>,
    pub shard_key: String,
    pub key_type: KeyType,
    pub algorithm: Algorithm,
    pub buckets: u32,
    pub ranges: Vec<RangeSpec>,
    /// `shard-geo-<region>` in file order: region and its address.
    pub geo_regions: Vec<(String, NodeAddr)>,
    pub geo_db: Option<PathBuf>,
    pub geo_country: BTreeMap<String, String>,
    pub geo_continent: BTreeMap<String, String>,
    pub default: Option<(String, NodeAddr)>,
    /// `shard-node-<name>` in file order.
    pub nodes: Vec<(String, NodeAddr)>,
    pub node_patroni: BTreeMap<String, Vec<String>>,
    /// `shard-node-<name>-password-file` / `-password-env`: where a node's password comes from instead of
    /// its URL (read when the config is loaded; never printed).
    #[serde(skip_serializing)]
    pub node_password_from: BTreeMap<String, PasswordFrom>,
    pub global_tables: Vec<String>,
    /// `shard-table-<table>,<column>`: the shard key column of one table (others use `shard-key`).
    pub table_keys: std::collections::BTreeMap<String, String>,
    pub read_replicas: bool,
    pub max_replica_lag_bytes: u64,
    /// `shard-replica-policy`: how a read picks among the standbys that pass the lag limit.
    pub replica_policy: ReplicaPolicy,
    /// `shard-degraded-reads`: while a shard has no primary, reads outside transactions go to a fresh-enough
    /// standby instead of waiting in the failover buffer.
    pub degraded_reads: bool,
    pub catalog: Option<String>,
    /// `shard-two-phase-commit`: transactions that write to several shards commit with two-phase commit
    /// (`false`: such transactions are refused, and all-shards transactions commit shard by shard).
    pub two_phase_commit: bool,
    pub router: RouterSettings,
    pub pool: PoolSettings,
    pub health: HealthSettings,
    pub circuit_breaker: CircuitBreakerSettings,
    pub failover: FailoverSettings,
    pub rebalance: RebalanceSettings,
}

/// Moves between shards (the `rebalance` CLI; see docs/moving-data.md).
#[derive(Clone, Debug, Serialize)]
pub struct RebalanceSettings {
    /// `rebalance-cutover-lag-bytes`: the replication lag under which a move freezes its unit and cuts over.
    pub cutover_lag_bytes: u64,
    /// `rebalance-max-freeze-ms`: the longest a unit may stay frozen; past it the move rolls back.
    pub max_freeze_ms: u64,
    /// `rebalance-grace-s`: how long the moved rows stay on the source (unreachable behind the guard)
    /// before they are deleted.
    pub grace_s: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RouterSettings {
    pub listen: String,
    pub auth: AuthMethod,
    #[serde(skip_serializing)]
    pub users: BTreeMap<String, String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub http: Option<String>,
    pub admin_users: Vec<String>,
    /// Threads serving clients: 0 (the default) is one per two cores; one thread is a single event loop (a
    /// single-threaded runtime, as PgBouncer has), more are workers of a multi-thread runtime.
    pub threads: u32,
    pub limits: ClientLimits,
    /// `router-user-<name>-tenants`: the only tenants (tenant strategy) a user may reach.
    pub user_tenants: BTreeMap<String, Vec<String>>,
}

/// What one client, and all of them, may take of the router (see docs/configuration.md, "Router and pool").
#[derive(Clone, Debug, Serialize)]
pub struct ClientLimits {
    /// `router-max-clients`: client connections at once; one more is refused (53300).
    pub max_clients: u64,
    /// `router-max-clients-per-user`: client connections of one user at once (0: no limit of its own).
    pub max_clients_per_user: u64,
    /// `router-max-clients-per-tenant`: client connections to one tenant's database at once (tenant strategy;
    /// 0: no limit of its own).
    pub max_clients_per_tenant: u64,
    /// `router-startup-timeout-ms`: from the connection to the end of authentication.
    pub startup_timeout_ms: u64,
    /// `router-max-message-bytes`: the largest message a client may send (COPY data included).
    pub max_message_bytes: u64,
    /// `router-max-client-buffer-bytes`: what a client's extended-protocol messages not yet synced may hold.
    pub max_client_buffer_bytes: u64,
    /// `router-client-idle-timeout-s`: a client idle outside a transaction this long is closed (0: never).
    pub client_idle_timeout_s: u64,
    /// `router-idle-transaction-timeout-s`: a client idle inside a transaction this long is closed, its
    /// transaction rolled back (0: never).
    pub idle_transaction_timeout_s: u64,
    /// `router-shutdown-timeout-s`: on SIGTERM, how long transactions in progress may take to finish.
    pub shutdown_timeout_s: u64,
    /// `router-rate-limit-*`: statements per user and per tenant.
    pub rate: RateLimit,
}

/// `router-rate-limit-statements` per `router-rate-limit-window-s`, with bursts up to
/// `router-rate-limit-burst`: a token bucket per user and one per tenant; a statement past it is refused
/// (53400).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    /// Statements a user (and a tenant) may run per window; 0: no limit.
    pub statements: u64,
    pub window_s: u64,
    /// The bucket's size: statements that may run at once after a quiet spell (0: `statements`).
    pub burst: u64,
}

impl RateLimit {
    /// The bucket's size.
    pub fn capacity(&self) -> f64 {
        (if self.burst == 0 { self.statements } else { self.burst }) as f64
    }

    /// How fast the bucket fills.
    pub fn per_second(&self) -> f64 {
        self.statements as f64 / self.window_s.max(1) as f64
    }
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            max_clients: 10_000,
            max_clients_per_user: 0,
            max_clients_per_tenant: 0,
            startup_timeout_ms: 15_000,
            max_message_bytes: 64 << 20,
            max_client_buffer_bytes: 64 << 20,
            client_idle_timeout_s: 0,
            idle_transaction_timeout_s: 0,
            shutdown_timeout_s: 30,
            rate: RateLimit { statements: 0, window_s: 1, burst: 0 },
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PoolSettings {
    pub mode: PoolMode,
    pub size: u32,
    pub timeout_ms: u64,
    pub idle_timeout_s: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct HealthSettings {
    pub enabled: bool,
    pub endpoint: String,
    pub interval_s: u64,
    pub timeout_s: u64,
    pub retries: u32,
}

/// Following a node's primary, and buffering statements while it has none (see docs/failover.md).
#[derive(Clone, Debug, Serialize)]
pub struct FailoverSettings {
    /// `patroni-interval-ms`: how often a node's primary is looked for again.
    pub patroni_interval_ms: u64,
    /// `failover-buffer-window-ms`: how long one statement may wait for a primary.
    pub buffer_window_ms: u64,
    /// `failover-buffer-size`: how many statements may wait at once, per node.
    pub buffer_size: u32,
    /// `failover-buffer-max-ms`: after a node has had no primary this long, statements fail at once.
    pub buffer_max_ms: u64,
    /// `patroni-ca-file`: the CA (PEM) that signed the Patroni REST APIs' certificates, for https:// URLs.
    pub patroni_ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CircuitBreakerSettings {
    pub enabled: bool,
    pub threshold: u32,
    pub timeout_s: u64,
    pub half_open_requests: u32,
}

/// One row as read: where it was, its name and its value.
struct Row {
    line: u64,
    name: String,
    value: String,
}

impl Config {
    /// Reads and validates a config.csv file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read(path).map_err(|source| ConfigError::Io { file: file.clone(), source })?;
        Config::parse(&file, &text)
    }

    /// Reads config.csv text; `file` names it in errors.
    pub fn parse(file: &str, text: &[u8]) -> Result<Config, ConfigError> {
        let rows = read_rows(file, text)?;
        Builder::new(file).build(rows)
    }
}

fn read_rows(file: &str, text: &[u8]) -> Result<Vec<Row>, ConfigError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .from_reader(text);
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| line_of(text, p.byte()));
            ConfigError::Key { file: file.into(), line, key: String::new(), message: format!("not CSV: {e}") }
        })?;
        // The csv crate does not count blank lines; count newlines up to the record's first byte instead.
        let line = record.position().map_or(0, |p| line_of(text, p.byte()));
        let name = record.get(0).unwrap_or("").to_string();
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        // A value may hold commas without quotes (shard-ranges, lists): the rest of the row is the value.
        let value = record.iter().skip(1).collect::<Vec<_>>().join(",");
        rows.push(Row { line, name, value });
    }
    Ok(rows)
}

/// The 1-based line of a byte offset.
fn line_of(text: &[u8], byte: u64) -> u64 {
    // A record's position can be the start of blank lines before it: skip them.
    let mut end = (byte as usize).min(text.len());
    while end < text.len() && matches!(text[end], b'\n' | b'\r' | b' ' | b'\t') {
        end += 1;
    }
    1 + text[..end].iter().filter(|&&b| b == b'\n').count() as u64
}

/// Collects rows into settings; errors carry the row's place.
struct Builder<'f> {
    file: &'f str,
    seen: BTreeMap<String, u64>,
    lines: BTreeMap<&'static str, u64>,
}

/// A typed value read from a row's text with serde, for the enum-valued keys.
fn de_enum<T: for<'de> Deserialize<'de>>(value: &str) -> Result<T, ()> {
    use serde::de::IntoDeserializer;
    let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> = value.into_deserializer();
    T::deserialize(de).map_err(|_| ())
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

fn list(v: &str) -> Vec<String> {
    v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

impl<'f> Builder<'f> {
    fn new(file: &'f str) -> Self {
        Builder { file, seen: BTreeMap::new(), lines: BTreeMap::new() }
    }

    fn err(&self, row: &Row, message: impl Into<String>) -> ConfigError {
        ConfigError::Key { file: self.file.into(), line: row.line, key: row.name.clone(), message: message.into() }
    }

    fn err_at(&self, key: &'static str, message: impl Into<String>) -> ConfigError {
        match self.lines.get(key) {
            Some(&line) => ConfigError::Key { file: self.file.into(), line, key: key.into(), message: message.into() },
            None => ConfigError::File { file: self.file.into(), message: message.into() },
        }
    }

    fn build(mut self, rows: Vec<Row>) -> Result<Config, ConfigError> {
        let mut c = Config {
            file: self.file.to_string(),
            strategy: Strategy::Hash,
            tenant_db_prefix: "gb_tenant_".into(),
            auto_create: false,
            shard_count: None,
            shard_key: String::new(),
            key_type: KeyType::Auto,
            algorithm: Algorithm::Modulo,
            buckets: 1024,
            ranges: Vec::new(),
            geo_regions: Vec::new(),
            geo_db: None,
            geo_country: BTreeMap::new(),
            geo_continent: BTreeMap::new(),
            default: None,
            nodes: Vec::new(),
            node_patroni: BTreeMap::new(),
            node_password_from: BTreeMap::new(),
            global_tables: Vec::new(),
            table_keys: Default::default(),
            read_replicas: false,
            max_replica_lag_bytes: 16 * 1024 * 1024,
            replica_policy: ReplicaPolicy::RoundRobin,
            degraded_reads: false,
            catalog: None,
            two_phase_commit: true,
            router: RouterSettings {
                listen: "127.0.0.1:6432".into(),
                auth: AuthMethod::ScramSha256,
                users: BTreeMap::new(),
                tls_cert: None,
                tls_key: None,
                http: None,
                admin_users: Vec::new(),
                threads: 0,
                limits: ClientLimits::default(),
                user_tenants: BTreeMap::new(),
            },
            pool: PoolSettings { mode: PoolMode::Transaction, size: 20, timeout_ms: 5000, idle_timeout_s: 600 },
            health: HealthSettings {
                enabled: false,
                endpoint: "/api/health".into(),
                interval_s: 10,
                timeout_s: 5,
                retries: 3,
            },
            circuit_breaker: CircuitBreakerSettings {
                enabled: false,
                threshold: 5,
                timeout_s: 30,
                half_open_requests: 3,
            },
            rebalance: RebalanceSettings { cutover_lag_bytes: 1 << 20, max_freeze_ms: 5000, grace_s: 0 },
            failover: FailoverSettings {
                patroni_interval_ms: 1000,
                patroni_ca_file: None,
                buffer_window_ms: 10_000,
                buffer_size: 1000,
                buffer_max_ms: 20_000,
            },
        };
        let mut strategy_set = false;
        for row in &rows {
            let name = row.name.to_ascii_lowercase();
            if !PREFIXES.iter().any(|p| name.starts_with(p)) {
                continue;
            }
            if let Some(first) = self.seen.insert(name.clone(), row.line) {
                return Err(self.err(row, format!("set twice (first on line {first})")));
            }
            self.apply(&mut c, row, &name, &mut strategy_set)?;
        }
        if !strategy_set {
            return Err(ConfigError::File {
                file: self.file.into(),
                message: "shard-strategy is missing (expected tenant, hash, range or geo)".into(),
            });
        }
        self.validate(&mut c)?;
        Ok(c)
    }

    fn apply(&mut self, c: &mut Config, row: &Row, name: &str, strategy_set: &mut bool) -> Result<(), ConfigError> {
        let v = row.value.as_str();
        let boolean =
            |b: &Builder<'_>| parse_bool(v).ok_or_else(|| b.err(row, format!("expected true or false, got {v:?}")));
        let number = |b: &Builder<'_>, min: u64| -> Result<u64, ConfigError> {
            match v.parse::<u64>() {
                Ok(n) if n >= min => Ok(n),
                _ => Err(b.err(row, format!("expected a whole number of at least {min}, got {v:?}"))),
            }
        };
        let text = |b: &Builder<'_>| -> Result<String, ConfigError> {
            if v.is_empty() {
                Err(b.err(row, "expected a value, got nothing"))
            } else {
                Ok(v.to_string())
            }
        };
        macro_rules! remember {
            ($k:literal) => {
                self.lines.insert($k, row.line);
            };
        }
        match name {
            "shard-strategy" => {
                remember!("shard-strategy");
                c.strategy =
                    de_enum(v).map_err(|_| self.err(row, format!("expected tenant, hash, range or geo, got {v:?}")))?;
                *strategy_set = true;
            }
            "shard-tenant-db-prefix" => c.tenant_db_prefix = text(self)?,
            "shard-auto-create" => c.auto_create = boolean(self)?,
            "shard-count" => {
                remember!("shard-count");
                let n = number(self, 1)?;
                if n > 4096 {
                    return Err(self.err(row, format!("expected at most 4096 shards, got {n}")));
                }
                c.shard_count = Some(n as u32);
            }
            "shard-key" => {
                let k = text(self)?;
                if !k.chars().all(|ch| ch.is_alphanumeric() || ch == '_') {
                    return Err(self.err(row, format!("expected a column name, got {k:?}")));
                }
                c.shard_key = k;
            }
            "shard-key-type" => {
                c.key_type =
                    de_enum(v).map_err(|_| self.err(row, format!("expected auto, int, uuid or text, got {v:?}")))?
            }
            "shard-algorithm" => {
                remember!("shard-algorithm");
                c.algorithm =
                    de_enum(v).map_err(|_| self.err(row, format!("expected modulo or hash-buckets, got {v:?}")))?
            }
            "shard-buckets" => {
                remember!("shard-buckets");
                let n = number(self, 1)?;
                if n > 1 << 20 {
                    return Err(self.err(row, format!("expected at most 1048576 buckets, got {n}")));
                }
                c.buckets = n as u32;
            }
            "shard-ranges" => {
                remember!("shard-ranges");
                c.ranges = self.ranges(row)?;
            }
            "shard-default" => {
                remember!("shard-default");
                c.default = Some(("default".into(), self.addr(row, v)?));
            }
            "shard-geo-db" => c.geo_db = Some(PathBuf::from(text(self)?)),
            "shard-global-tables" => c.global_tables = list(v).into_iter().map(|t| t.to_lowercase()).collect(),
            "shard-read-replicas" => c.read_replicas = boolean(self)?,
            "shard-max-replica-lag-bytes" => c.max_replica_lag_bytes = number(self, 0)?,
            "shard-replica-policy" => {
                c.replica_policy = de_enum(v).map_err(|_| {
                    self.err(row, format!("expected round_robin, least_conn, random or first, got {v:?}"))
                })?
            }
            "shard-degraded-reads" => c.degraded_reads = boolean(self)?,
            "shard-catalog" => c.catalog = Some(text(self)?),
            "shard-two-phase-commit" => c.two_phase_commit = boolean(self)?,
            "router-listen" => c.router.listen = text(self)?,
            "router-auth" => {
                c.router.auth =
                    de_enum(v).map_err(|_| self.err(row, format!("expected scram-sha-256, md5 or trust, got {v:?}")))?
            }
            "router-tls-cert" => c.router.tls_cert = Some(PathBuf::from(text(self)?)),
            "router-tls-key" => c.router.tls_key = Some(PathBuf::from(text(self)?)),
            "router-http" => c.router.http = Some(text(self)?),
            "router-admin-users" => c.router.admin_users = list(v),
            "router-threads" => {
                let n = number(self, 0)?;
                if n > 1024 {
                    return Err(self.err(row, format!("expected at most 1024 threads, got {n}")));
                }
                c.router.threads = n as u32;
            }
            "router-max-clients" => c.router.limits.max_clients = number(self, 1)?,
            "router-max-clients-per-user" => c.router.limits.max_clients_per_user = number(self, 0)?,
            "router-max-clients-per-tenant" => c.router.limits.max_clients_per_tenant = number(self, 0)?,
            "router-startup-timeout-ms" => c.router.limits.startup_timeout_ms = number(self, 100)?,
            "router-max-message-bytes" => {
                let n = number(self, 1024)?;
                if n > 1 << 30 {
                    return Err(self.err(row, format!("expected at most 1073741824 (PostgreSQL's own limit), got {n}")));
                }
                c.router.limits.max_message_bytes = n;
            }
            "router-max-client-buffer-bytes" => c.router.limits.max_client_buffer_bytes = number(self, 1024)?,
            "router-client-idle-timeout-s" => c.router.limits.client_idle_timeout_s = number(self, 0)?,
            "router-idle-transaction-timeout-s" => c.router.limits.idle_transaction_timeout_s = number(self, 0)?,
            "router-shutdown-timeout-s" => c.router.limits.shutdown_timeout_s = number(self, 0)?,
            "router-rate-limit-statements" => c.router.limits.rate.statements = number(self, 0)?,
            "router-rate-limit-window-s" => c.router.limits.rate.window_s = number(self, 1)?,
            "router-rate-limit-burst" => c.router.limits.rate.burst = number(self, 0)?,
            "pool-mode" => {
                c.pool.mode =
                    de_enum(v).map_err(|_| self.err(row, format!("expected transaction or session, got {v:?}")))?
            }
            "pool-size" => c.pool.size = number(self, 1)? as u32,
            "pool-timeout-ms" => c.pool.timeout_ms = number(self, 1)?,
            "pool-idle-timeout" => c.pool.idle_timeout_s = number(self, 0)?,
            "patroni-interval-ms" => c.failover.patroni_interval_ms = number(self, 10)?,
            "patroni-ca-file" => c.failover.patroni_ca_file = Some(PathBuf::from(text(self)?)),
            "failover-buffer-window-ms" => c.failover.buffer_window_ms = number(self, 0)?,
            "failover-buffer-size" => c.failover.buffer_size = number(self, 0)?.min(u32::MAX.into()) as u32,
            "failover-buffer-max-ms" => c.failover.buffer_max_ms = number(self, 0)?,
            "rebalance-cutover-lag-bytes" => c.rebalance.cutover_lag_bytes = number(self, 0)?,
            "rebalance-max-freeze-ms" => c.rebalance.max_freeze_ms = number(self, 100)?,
            "rebalance-grace-s" => c.rebalance.grace_s = number(self, 0)?,
            "health-enabled" => c.health.enabled = boolean(self)?,
            "health-endpoint" => {
                let e = text(self)?;
                if !e.starts_with('/') {
                    return Err(self.err(row, format!("expected a path starting with '/', got {e:?}")));
                }
                c.health.endpoint = e;
            }
            "health-interval" => c.health.interval_s = number(self, 1)?,
            "health-timeout" => c.health.timeout_s = number(self, 1)?,
            "health-retries" => c.health.retries = number(self, 0)? as u32,
            "circuit-breaker-enabled" => c.circuit_breaker.enabled = boolean(self)?,
            "circuit-breaker-threshold" => c.circuit_breaker.threshold = number(self, 1)? as u32,
            "circuit-breaker-timeout" => c.circuit_breaker.timeout_s = number(self, 1)?,
            "circuit-breaker-half-open-requests" => c.circuit_breaker.half_open_requests = number(self, 1)? as u32,
            _ => return self.dynamic(c, row, name),
        }
        Ok(())
    }

    /// Keys with a name inside them: `shard-node-<name>[-patroni]`, `shard-table-<table>`, `shard-geo-...`,
    /// `router-user-<name>`.
    fn dynamic(&mut self, c: &mut Config, row: &Row, name: &str) -> Result<(), ConfigError> {
        let v = row.value.as_str();
        // Names keep their case from the file (node names appear in shard-ranges).
        let original = &row.name[row.name.len() - name.len()..];
        if let Some(rest) = name.starts_with("shard-node-").then(|| &original["shard-node-".len()..]) {
            let lower = rest.to_ascii_lowercase();
            let file = lower.strip_suffix("-password-file").map(|n| (&rest[..n.len()], true));
            let env = lower.strip_suffix("-password-env").map(|n| (&rest[..n.len()], false));
            if let Some((node, file)) = file.or(env) {
                if v.trim().is_empty() {
                    return Err(self.err(row, "expected a value, got nothing"));
                }
                let from =
                    if file { PasswordFrom::File(PathBuf::from(v.trim())) } else { PasswordFrom::Env(v.trim().into()) };
                c.node_password_from.insert(node.to_string(), from);
                return Ok(());
            }
            if let Some(node) = rest.strip_suffix("-patroni").or_else(|| rest.strip_suffix("-PATRONI")) {
                let urls = list(v);
                if urls.is_empty() || urls.iter().any(|u| !u.starts_with("http://") && !u.starts_with("https://")) {
                    return Err(
                        self.err(row, format!("expected http://host:port URLs of Patroni's REST API, got {v:?}"))
                    );
                }
                c.node_patroni.insert(node.to_string(), urls);
                return Ok(());
            }
            if !valid_name(rest) {
                return Err(self.err(row, format!("{rest:?} is not a node name (letters, digits, '_' and '-')")));
            }
            if !v.starts_with("postgres://") && !v.starts_with("postgresql://") {
                return Err(self.err(row, format!("expected postgres://user:password@host:port/dbname, got {v:?}")));
            }
            let addr = self.addr(row, v)?;
            c.nodes.push((rest.to_string(), addr));
            return Ok(());
        }
        if let Some(table) = name.strip_prefix("shard-table-") {
            let column = v.trim().to_lowercase();
            if !valid_name(table) || table.is_empty() {
                return Err(self.err(row, format!("{table:?} is not a table name (letters, digits and '_')")));
            }
            if column.is_empty() || !column.chars().all(|ch| ch.is_alphanumeric() || ch == '_') {
                return Err(self.err(row, format!("expected the shard key column of table {table}, got {v:?}")));
            }
            c.table_keys.insert(table.to_lowercase(), column);
            return Ok(());
        }
        if let Some(cc) = name.strip_prefix("shard-geo-country-") {
            let cc = cc.to_ascii_uppercase();
            if crate::geo::continent_of(&cc).is_none() {
                return Err(self.err(row, format!("{cc:?} is not an ISO 3166 country code")));
            }
            c.geo_country.insert(cc, v.to_ascii_lowercase());
            return Ok(());
        }
        if let Some(cc) = name.strip_prefix("shard-geo-continent-") {
            let cc = cc.to_ascii_uppercase();
            if !crate::geo::CONTINENTS.contains(&cc.as_str()) {
                return Err(self.err(row, format!("{cc:?} is not a continent code (AF, AN, AS, EU, NA, OC, SA)")));
            }
            c.geo_continent.insert(cc, v.to_ascii_lowercase());
            return Ok(());
        }
        if let Some(region) = name.strip_prefix("shard-geo-") {
            if !valid_name(region) {
                return Err(self.err(row, format!("{region:?} is not a region name")));
            }
            let addr = self.addr(row, v)?;
            c.geo_regions.push((region.to_string(), addr));
            return Ok(());
        }
        if let Some(user) = original.get("router-user-".len()..).filter(|_| name.starts_with("router-user-")) {
            if user.is_empty() {
                return Err(self.err(row, "expected router-user-<name>"));
            }
            if let Some(u) = user.strip_suffix("-tenants").filter(|u| !u.is_empty()) {
                let tenants = list(v);
                if tenants.is_empty() {
                    return Err(self.err(row, "expected the tenants the user may reach, comma-separated"));
                }
                c.router.user_tenants.insert(u.to_string(), tenants);
                return Ok(());
            }
            c.router.users.insert(user.to_string(), v.to_string());
            return Ok(());
        }
        let mut message = "unknown key".to_string();
        if let Some(best) = suggest(name) {
            message.push_str(&format!("; did you mean {best}?"));
        } else {
            message.push_str(&format!("; keys starting with {} are this project's: see the README", prefix_of(name)));
        }
        Err(self.err(row, message))
    }

    fn addr(&self, row: &Row, v: &str) -> Result<NodeAddr, ConfigError> {
        parse_addr(v).map_err(|m| self.err(row, m))
    }

    fn ranges(&self, row: &Row) -> Result<Vec<RangeSpec>, ConfigError> {
        let mut out: Vec<RangeSpec> = Vec::new();
        for part in list(&row.value) {
            let bad = |why: &str| self.err(row, format!("{part:?}: {why} (expected start-end:name or start-:name)"));
            let (bounds, node) = part.rsplit_once(':').ok_or_else(|| bad("no ':name'"))?;
            let node = node.trim();
            if !valid_name(node) {
                return Err(bad("not a node name"));
            }
            let (s, e) = bounds.split_once('-').ok_or_else(|| bad("no '-'"))?;
            let start = s.trim().parse::<i64>().map_err(|_| bad("the start is not a whole number"))?;
            let end = match e.trim() {
                "" => None,
                e => Some(e.parse::<i64>().map_err(|_| bad("the end is not a whole number"))?),
            };
            if end.is_some_and(|e| e < start) {
                return Err(bad("the end is below the start"));
            }
            if let Some(prev) = out.last() {
                match prev.end {
                    None => return Err(bad("comes after an open range")),
                    Some(pe) if start <= pe => {
                        return Err(bad(&format!("overlaps {}-{pe}:{}", prev.start, prev.node)));
                    }
                    Some(pe) if start != pe + 1 => {
                        return Err(bad(&format!(
                            "leaves a gap after {}-{pe}:{} (next should start at {})",
                            prev.start,
                            prev.node,
                            pe + 1
                        )));
                    }
                    _ => {}
                }
            }
            out.push(RangeSpec { start, end, node: node.to_string() });
        }
        if out.is_empty() {
            return Err(self.err(row, "expected at least one range, e.g. 0-999999:shard1,1000000-:shard2"));
        }
        Ok(out)
    }

    /// Checks across keys, once every row is read.
    fn validate(&self, c: &mut Config) -> Result<(), ConfigError> {
        if c.shard_key.is_empty() {
            c.shard_key = match c.strategy {
                Strategy::Geo => "region".into(),
                Strategy::Tenant => "tenant_id".into(),
                Strategy::Hash | Strategy::Range => "user_id".into(),
            };
        }
        for t in c.table_keys.keys() {
            if c.global_tables.contains(t) {
                return Err(self.err_at(
                    "shard-global-tables",
                    format!("{t} is global and has a shard-table-{t} key: a global table has no shard key"),
                ));
            }
        }
        let names: Vec<&str> = c.nodes.iter().map(|(n, _)| n.as_str()).collect();
        match c.strategy {
            Strategy::Hash => {
                let count = c
                    .shard_count
                    .ok_or_else(|| self.err_at("shard-strategy", "the hash strategy needs shard-count"))?;
                if c.algorithm == Algorithm::HashBuckets && c.buckets < count {
                    return Err(self
                        .err_at("shard-buckets", format!("{} buckets cannot spread over {count} shards", c.buckets)));
                }
                for n in &names {
                    if n.parse::<u32>().map_or(true, |i| i >= count) {
                        return Err(self.node_err(n, &format!("hash nodes are named 0 to {}", count - 1)));
                    }
                }
            }
            Strategy::Range => {
                if c.ranges.is_empty() {
                    return Err(self.err_at("shard-strategy", "the range strategy needs shard-ranges"));
                }
                for n in &names {
                    if !c.ranges.iter().any(|r| r.node == *n) {
                        return Err(self.node_err(n, "range nodes are named by shard-ranges"));
                    }
                }
            }
            Strategy::Geo => {
                if c.geo_regions.is_empty() && c.default.is_none() {
                    return Err(self
                        .err_at("shard-strategy", "the geo strategy needs shard-geo-<region> keys or shard-default"));
                }
                let regions: Vec<&str> = c.geo_regions.iter().map(|(r, _)| r.as_str()).collect();
                for (cc, region) in c.geo_country.iter().chain(c.geo_continent.iter()) {
                    if !regions.contains(&region.as_str()) {
                        return Err(ConfigError::File {
                            file: self.file.into(),
                            message: format!("{cc} maps to region {region:?}, which has no shard-geo-{region} key"),
                        });
                    }
                }
                for n in &names {
                    if !regions.contains(n) && *n != "default" {
                        return Err(self.node_err(n, "geo nodes are named by region (or default)"));
                    }
                }
            }
            Strategy::Tenant => {}
        }
        if matches!(c.strategy, Strategy::Range | Strategy::Geo) && self.lines.contains_key("shard-count") {
            return Err(self.err_at("shard-count", "shard-count belongs to the hash strategy"));
        }
        let https = c.node_patroni.iter().find(|(_, urls)| urls.iter().any(|u| u.starts_with("https://")));
        if let (Some((node, _)), None) = (https, &c.failover.patroni_ca_file) {
            return Err(ConfigError::File {
                file: self.file.into(),
                message: format!(
                    "shard-node-{node}-patroni has https:// URLs: set patroni-ca-file to the CA that signed their certificates"
                ),
            });
        }
        for node in c.node_patroni.keys() {
            if !names.contains(&node.as_str()) {
                return Err(ConfigError::File {
                    file: self.file.into(),
                    message: format!("shard-node-{node}-patroni names a node that has no shard-node-{node} key"),
                });
            }
        }
        for (node, from) in &c.node_password_from {
            let key = match from {
                PasswordFrom::File(_) => format!("shard-node-{node}-password-file"),
                PasswordFrom::Env(_) => format!("shard-node-{node}-password-env"),
            };
            let err = |message: String| ConfigError::File { file: self.file.into(), message };
            let Some((_, addr)) = c.nodes.iter_mut().find(|(n, _)| n == node) else {
                return Err(err(format!("{key} names a node that has no shard-node-{node} key")));
            };
            let password = match from {
                PasswordFrom::File(path) => std::fs::read_to_string(path)
                    .map_err(|e| err(format!("{key}: cannot read {}: {e}", path.display())))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
                PasswordFrom::Env(var) => {
                    std::env::var(var).map_err(|_| err(format!("{key}: the environment variable {var} is not set")))?
                }
            };
            addr.password = Some(password);
        }
        if let (Some(user), false) = (c.router.user_tenants.keys().next(), c.strategy == Strategy::Tenant) {
            return Err(ConfigError::File {
                file: self.file.into(),
                message: format!("router-user-{user}-tenants limits a user to tenants: it needs shard-strategy,tenant"),
            });
        }
        if c.router.tls_cert.is_some() != c.router.tls_key.is_some() {
            return Err(ConfigError::File {
                file: self.file.into(),
                message: "router-tls-cert and router-tls-key go together".into(),
            });
        }
        Ok(())
    }

    fn node_err(&self, node: &str, why: &str) -> ConfigError {
        let key = format!("shard-node-{node}");
        let line = self.seen.get(&key.to_ascii_lowercase()).copied().unwrap_or(0);
        ConfigError::Key { file: self.file.into(), line, key, message: format!("no such node: {why}") }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
}

fn prefix_of(name: &str) -> &'static str {
    PREFIXES.iter().find(|p| name.starts_with(*p)).copied().unwrap_or("")
}

/// The known key nearest to `name`, if it is near enough to be a typo.
fn suggest(name: &str) -> Option<&'static str> {
    KEYS.iter()
        .map(|k| (strsim::damerau_levenshtein(name, k), *k))
        .filter(|(d, k)| *d <= 3.max(k.len() / 5))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Parses a node address (see [`NodeAddr`]).
pub fn parse_addr(v: &str) -> Result<NodeAddr, String> {
    let rest = v.strip_prefix("postgres://").or_else(|| v.strip_prefix("postgresql://"));
    let Some(rest) = rest else {
        // A bare host or host:port.
        if v.is_empty() || v.contains('/') || v.contains('@') {
            return Err(format!("expected a host, host:port or postgres:// URL, got {v:?}"));
        }
        return Ok(NodeAddr {
            hosts: vec![host_port(v)?],
            user: None,
            password: None,
            dbname: None,
            params: Vec::new(),
        });
    };
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, dbname) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = authority.rsplit_once('@').map_or((None, authority), |(u, h)| (Some(u), h));
    let (user, password) = match userinfo {
        None => (None, None),
        Some(u) => match u.split_once(':') {
            Some((u, p)) => (Some(pct_decode(u)?), Some(pct_decode(p)?)),
            None => (Some(pct_decode(u)?), None),
        },
    };
    if hosts.is_empty() {
        return Err(format!("{v:?} has no host"));
    }
    let hosts = hosts.split(',').map(host_port).collect::<Result<Vec<_>, _>>()?;
    let params = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, val) = p.split_once('=').unwrap_or((p, ""));
            Ok((pct_decode(k)?, pct_decode(val)?))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(NodeAddr {
        hosts,
        user: user.filter(|u| !u.is_empty()),
        password,
        dbname: Some(pct_decode(dbname)?).filter(|d| !d.is_empty()),
        params,
    })
}

fn host_port(s: &str) -> Result<(String, u16), String> {
    let s = s.trim();
    // [::1]:5432
    if let Some(inner) = s.strip_prefix('[') {
        let (h, rest) = inner.split_once(']').ok_or_else(|| format!("{s:?}: unclosed '['"))?;
        let port = match rest.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("{s:?}: bad port"))?,
            None => 5432,
        };
        return Ok((h.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Ok((h.to_string(), p.parse().map_err(|_| format!("{s:?}: bad port {p:?}"))?)),
        Some(_) => Err(format!("{s:?}: no host")),
        None if s.is_empty() => Err("empty host".into()),
        None => Ok((s.to_string(), 5432)),
    }
}

fn pct_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(|| format!("{s:?}: bad %-escape"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("{s:?}: bad %-escape"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?}: not UTF-8 once decoded"))
}

impl fmt::Display for NodeAddr {
    /// The address without its password, for logs and `explain`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("postgres://")?;
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        for (i, (h, p)) in self.hosts.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if h.contains(':') {
                write!(f, "[{h}]:{p}")?;
            } else {
                write!(f, "{h}:{p}")?;
            }
        }
        if let Some(d) = &self.dbname {
            write!(f, "/{d}")?;
        }
        Ok(())
    }
}
