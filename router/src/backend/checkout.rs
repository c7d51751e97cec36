//! A client's way to the servers: who it connects as, the pools it used last, and a checkout that brings a
//! connection to the client's session settings, waits for a primary during a failover (the failover
//! buffer), respects PAUSE and the circuit breaker, and creates a tenant's database on first use.

use std::sync::Arc;

use shardmap::ShardId;

use super::cancel::Slot;
use super::conn::{BackendError, Target};
use super::pool::{self, Parking, Pool, PoolKey, Pooled};
use super::Backends;
use crate::net::Reported;

/// Server-side prepared statements a pooled connection keeps before they are all deallocated.
pub const MAX_PREPARED: usize = 2000;

/// The SQLSTATE of a failed connection attempt: nothing was sent, so another shard may be tried.
pub const CONNECT_FAILED: &str = "08001";

/// The session settings a connection must carry for a client (its SETs and startup parameters).
pub trait Carry {
    /// A hash of the settings (0: none); a connection records the hash of what was replayed on it.
    fn hash(&self) -> u64;
    /// The SQL that brings a connection to them (`RESET ALL` first when it carries others).
    fn replay_sql(&self, reset_first: bool) -> String;
}

/// A connection's settings hash when what it carries is not known (a RESET ran on it, a statement that
/// changed settings failed): the next checkout replays the client's.
pub const SETTINGS_UNKNOWN: u64 = u64::MAX;

/// One client's access to the backends.
pub struct Checkout {
    pub backends: Arc<Backends>,
    /// The user and database the client connected as (a node URL without them uses these).
    pub user: String,
    pub database: String,
    /// Where a CancelRequest for this client finds its server connections.
    pub cancel: Arc<Slot>,
    /// The event loop this client is served on: its pools' idle connections of this home come first.
    pub home: usize,
    /// The pools of the shards' default databases, by shard, with the generation of the shard's primary
    /// they were made for: a checkout does not look them up again until a failover.
    pools: Vec<Option<(u64, Arc<Pool>)>>,
    /// The running config as of the client's last message (see [`Checkout::refresh`]): read on every
    /// statement, where a load of the shared config (RELOAD replaces it) would cost more than the pointer
    /// comparison that keeps this one current.
    pub config: Arc<shardmap::Config>,
    config_cache: arc_swap::Cache<Arc<arc_swap::ArcSwap<shardmap::Config>>, Arc<shardmap::Config>>,
    /// The server connection the client keeps between transactions (transaction pooling; see
    /// [`Pool::park`]); none in session mode, where the session holds its connections itself.
    parking: Option<Arc<Parking>>,
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(parking) = &self.parking {
            parking.give_back();
        }
    }
}

impl Checkout {
    pub fn new(backends: Arc<Backends>, user: String, database: String, cancel: Arc<Slot>) -> Checkout {
        let mut config_cache = arc_swap::Cache::new(backends.config.clone());
        let config = config_cache.load().clone();
        let parking = (config.pool.mode == shardmap::config::PoolMode::Transaction).then(Arc::default);
        Checkout { backends, user, database, cancel, home: 0, pools: Vec::new(), config, config_cache, parking }
    }

    /// Brings [`Checkout::config`] up to the running config (after a RELOAD); a pointer comparison when
    /// nothing changed.
    pub fn refresh(&mut self) {
        let now = self.config_cache.load();
        if !Arc::ptr_eq(now, &self.config) {
            self.config = now.clone();
        }
    }

    /// The pool of a shard for this client (and, under the tenant strategy, its database). A shard without a
    /// primary right now (failover) makes this wait for one, within the failover buffer.
    pub async fn pool_for(&self, shard: ShardId, database: Option<&str>) -> Result<(u64, Arc<Pool>), Reported> {
        let b = &self.backends;
        let node = b.map.node(shard);
        let addr = node.addr.as_ref().ok_or_else(|| {
            Reported::new(
                CONNECT_FAILED,
                format!("shard {} has no address: add shard-node-{} to the config", node.name, node.name),
            )
        })?;
        let ((host, port), generation) =
            b.topology.primary(shard, &node.name).await.map_err(|e| Reported::new(CONNECT_FAILED, e.0))?;
        let target = self.target(addr, (host, port), database);
        Ok((generation, b.pools.pool(PoolKey { shard, target }, &node.name)))
    }

    /// Where and as whom to connect on `host` for this client.
    fn target(&self, addr: &shardmap::config::NodeAddr, (host, port): (String, u16), database: Option<&str>) -> Target {
        let user = addr.user.clone().unwrap_or_else(|| self.user.clone());
        // (A client's SCRAM verifier is no password to give a server.)
        let password = addr.password.clone().or_else(|| {
            (user == self.user)
                .then(|| self.config.router.users.get(&self.user).cloned())
                .flatten()
                .filter(|p| !p.starts_with("SCRAM-SHA-256$"))
        });
        let database =
            database.map(str::to_string).or_else(|| addr.dbname.clone()).unwrap_or_else(|| self.database.clone());
        Target { host, port, user, password, database, tls: super::tls::Tls::of(&addr.params) }
    }

    /// The pool for `shard` as cached (the default database's, for the primary's current generation).
    fn cached(&self, shard: ShardId, database: Option<&str>) -> Option<(u64, Arc<Pool>)> {
        self.cached_ref(shard, database).map(|(g, p)| (g, p.clone()))
    }

    /// [`Checkout::cached`], borrowed.
    fn cached_ref(&self, shard: ShardId, database: Option<&str>) -> Option<(u64, &Arc<Pool>)> {
        let generation = self.backends.topology.generation(shard);
        match (database, self.pools.get(shard.0 as usize)) {
            (None, Some(Some((g, p)))) if *g == generation => Some((generation, p)),
            _ => None,
        }
    }

    /// The pool for `shard` (cached per shard for the default database), and the generation it is for.
    async fn pool(&mut self, shard: ShardId, database: Option<&str>) -> Result<(u64, Arc<Pool>), Reported> {
        if let Some(cached) = self.cached(shard, database) {
            return Ok(cached);
        }
        let generation = self.backends.topology.generation(shard);
        let (g, pool) = Box::pin(self.pool_for(shard, database)).await?;
        if database.is_none() {
            if self.pools.len() <= shard.0 as usize {
                self.pools.resize(shard.0 as usize + 1, None);
            }
            self.pools[shard.0 as usize] = Some((g, pool.clone()));
        }
        Ok((generation, pool))
    }

    /// Whether `p` is a connection of the pool this client would get for `shard` now (after a failover, a
    /// session-mode client's old connection is not).
    pub async fn is_current(&mut self, p: &Pooled, database: Option<&str>) -> bool {
        match self.pool(p.shard(), database).await {
            Ok((_, pool)) => p.is_from(&pool),
            Err(_) => false,
        }
    }

    /// Checks out a connection and brings its session settings in line with the client's.
    pub async fn get(
        &mut self,
        shard: ShardId,
        database: Option<&str>,
        carry: &(dyn Carry + Sync),
    ) -> Result<Pooled, Reported> {
        Ok(self.get_with(shard, database, carry, true).await?.expect("a checkout that waits gets one or fails"))
    }

    /// `router-user-<name>-tenants`: a user limited to tenants reaches their databases only — whatever led to
    /// the database (the one it connected to, `SET gb.tenant`, a hint, a key value): every server connection
    /// is checked out here.
    fn may_reach(&self, shard: ShardId, database: Option<&str>) -> Result<(), Reported> {
        let Some(tenants) = self.config.router.user_tenants.get(&self.user) else { return Ok(()) };
        let node_db = self.backends.map.node(shard).addr.as_ref().and_then(|a| a.dbname.clone());
        let db = database.map(str::to_string).or(node_db).unwrap_or_else(|| self.database.clone());
        match self.backends.map.tenant_of_database(&db) {
            Some(t) if tenants.iter().any(|x| x == t) => Ok(()),
            _ => Err(Reported::new(
                "42501",
                format!(
                    "permission denied: user \"{}\" may reach only the databases of its tenants ({}: router-user-{}-tenants), not {db}",
                    self.user,
                    tenants.join(", "),
                    self.user
                ),
            )),
        }
    }

    /// [`Checkout::get`] without an await, for the common cases under transaction pooling: the client kept a
    /// connection of the shard's pool since its last transaction, or the pool has a permit free and an idle
    /// connection; either carrying the client's settings. When every connection is taken, a [`Wait`] to
    /// await and then end with [`Checkout::handed`]. [`Now::Slow`]: neither (a connection to open, other
    /// settings to replay, a PAUSE, the pool not cached yet) — call [`Checkout::get`]. (An `async fn` costs
    /// its future's set-up and poll even when it never waits, and a wait through the layers of `async`
    /// checkout polls each of them again when the connection comes. With several shards, most statements go
    /// to another shard than the client's last one and take an idle connection.)
    pub fn get_now(&mut self, shard: ShardId, database: Option<&str>, carry: &(dyn Carry + Sync)) -> Now {
        let Some((generation, pool)) = self.cached_ref(shard, database) else { return Now::Slow };
        if self.backends.topology.is_paused(shard) {
            return Now::Slow;
        }
        if let Err(e) = self.may_reach(shard, database) {
            return Now::Failed(e);
        }
        let kept = self.parking.as_ref().and_then(|k| pool.unpark(k));
        let fresh = kept.is_none();
        let mut p = match kept {
            Some(p) => p,
            None => match pool.take_now(self.home) {
                pool::Now::Got(p) => p,
                pool::Now::Slow => return Now::Slow,
                pool::Now::Wait(ticket) => {
                    return match self.admit(shard, generation) {
                        Ok(()) => Now::Wait(Wait { ticket }),
                        Err(e) => Now::Failed(e),
                    }
                }
            },
        };
        if !fits(&mut p, carry) {
            // (Work with awaits: the connection goes back to the client's parking or to the pool, where `get`
            // takes it.)
            p.release();
            return Now::Slow;
        }
        if let Err(e) = self.admit(shard, generation) {
            p.release();
            return Now::Failed(e);
        }
        p.register_cancel(&self.cancel);
        if let Some(k) = self.parking.as_ref().filter(|_| fresh) {
            p.keep_in(k);
        }
        Now::Got(p)
    }

    /// The end of a [`Wait`] (`got`: what its ticket gave): the connection handed over, taken up without an
    /// await when it carries the client's settings. `Err`: a bare permit, or other settings to replay —
    /// [`Checkout::finish`] it.
    pub fn handed(&self, got: Waited, carry: &(dyn Carry + Sync)) -> Result<Result<Pooled, Reported>, Pooled> {
        let mut p = match got.got {
            Ok(p) => p,
            Err(e) => return Ok(Err(e.into())),
        };
        if p.is_bare() || !fits(&mut p, carry) {
            return Err(p);
        }
        p.register_cancel(&self.cancel);
        if let Some(k) = &self.parking {
            p.keep_in(k);
        }
        Ok(Ok(p))
    }

    /// [`Checkout::handed`]'s work with awaits: a connection for a bare permit, the client's settings.
    pub async fn finish(
        &mut self,
        shard: ShardId,
        database: Option<&str>,
        p: Pooled,
        carry: &(dyn Carry + Sync),
    ) -> Result<Pooled, Reported> {
        let pool = p.pool().clone();
        let generation = self.backends.topology.generation(shard);
        let mut p = match pool.fill(p, self.home).await {
            Ok(p) => p,
            Err(e) => self.failed_checkout(&pool, shard, database, generation, e).await?,
        };
        self.take_up(&mut p, carry).await?;
        if let Some(k) = &self.parking {
            p.keep_in(k);
        }
        Ok(p)
    }

    /// The circuit breaker's word on a new transaction on `shard` (of `generation`).
    fn admit(&self, shard: ShardId, generation: u64) -> Result<(), Reported> {
        let b = &self.backends;
        b.breaker
            .admit(shard.0 as usize, generation, &b.map.node(shard).name)
            .map_err(|m| Reported::new(CONNECT_FAILED, m))
    }

    /// [`Checkout::get`]; `wait: false`: `None` at once when the shard's pool has no connection free.
    pub async fn get_with(
        &mut self,
        shard: ShardId,
        database: Option<&str>,
        carry: &(dyn Carry + Sync),
        wait: bool,
    ) -> Result<Option<Pooled>, Reported> {
        self.may_reach(shard, database)?;
        // (The pool and the router's handles are borrowed, not cloned: a reference count that every thread
        // bumps on every statement would pass its cache line from core to core.)
        let fetched;
        let (generation, pool) = match self.cached_ref(shard, database) {
            Some(cached) => cached,
            None => {
                fetched = Box::pin(self.pool(shard, database)).await?;
                (fetched.0, &fetched.1)
            }
        };
        let b = &self.backends;
        if b.topology.is_paused(shard) {
            // The admin console's PAUSE: a new transaction waits for RESUME.
            Box::pin(b.topology.wait_resumed(shard)).await;
        }
        self.admit(shard, generation)?;
        // The connection of the client's last transaction, when it kept one of this pool.
        let kept = self.parking.as_ref().and_then(|k| pool.unpark(k));
        let fresh = kept.is_none();
        let got = match kept {
            Some(p) => Ok(Some(p)),
            None => pool.get_with(wait, self.home).await,
        };
        let mut p = match got {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(None),
            Err(e) => self.failed_checkout(pool, shard, database, generation, e).await?,
        };
        self.take_up(&mut p, carry).await?;
        if let Some(k) = self.parking.as_ref().filter(|_| fresh) {
            p.keep_in(k);
        }
        Ok(Some(p))
    }

    /// The ParameterStatus for a startup of this client on `shard` (and tenant database `database`) with
    /// startup settings `carry`, when a client of the same user, database and startup settings started there
    /// recently on the same primary (see [`Backends::welcome`]): the server's answer to those settings,
    /// without a checkout — so that a client connects while every server connection is taken.
    pub fn welcome(
        &self,
        shard: ShardId,
        database: Option<&str>,
        carry: &dyn Carry,
    ) -> Option<Arc<[(String, String)]>> {
        self.backends.welcome(&self.welcome_key(shard, database, carry))
    }

    /// Remembers what a server answered a startup of this client (see [`Checkout::welcome`]).
    pub fn remember_welcome(
        &self,
        shard: ShardId,
        database: Option<&str>,
        carry: &dyn Carry,
        params: &[(String, String)],
    ) {
        self.backends.remember_welcome(self.welcome_key(shard, database, carry), params);
    }

    fn welcome_key(&self, shard: ShardId, database: Option<&str>, carry: &dyn Carry) -> super::WelcomeKey {
        super::WelcomeKey {
            shard,
            db: database.map(str::to_string),
            user: self.user.clone(),
            database: self.database.clone(),
            settings: carry.hash(),
        }
    }

    /// A checkout of `pool` failed with `e`: under `shard-auto-create` a tenant's missing database is made and
    /// the checkout tried again; otherwise a failed connection marks the shard down and counts for the circuit
    /// breaker.
    async fn failed_checkout(
        &self,
        pool: &Arc<Pool>,
        shard: ShardId,
        database: Option<&str>,
        generation: u64,
        e: super::pool::PoolError,
    ) -> Result<Pooled, Reported> {
        let b = &self.backends;
        match database {
            Some(db) if e.sqlstate() == "3D000" && self.config.auto_create => {
                // shard-auto-create: the tenant's database is made on first use, then the checkout retried.
                Box::pin(super::tenant::create(b, shard, db)).await?;
                Ok(pool.get(self.home).await?)
            }
            _ => {
                if e.sqlstate() == CONNECT_FAILED {
                    b.mark_down(shard);
                }
                if e.sqlstate().starts_with("08") {
                    b.breaker.failure(shard.0 as usize, generation);
                }
                Err(e.into())
            }
        }
    }

    /// `shard-read-replicas` (the caller checked that the statement may read there): a connection to a
    /// standby of `shard` that is fresh enough, if there is one and it can be reached (`None`: read on the
    /// primary).
    pub async fn replica(
        &mut self,
        shard: ShardId,
        database: Option<&str>,
        carry: &(dyn Carry + Sync),
    ) -> Option<Pooled> {
        self.may_reach(shard, database).ok()?;
        let b = self.backends.clone();
        let (max_lag, policy) = (self.config.max_replica_lag_bytes, self.config.replica_policy);
        let fresh = b.topology.fresh_replicas(shard, max_lag);
        if fresh.is_empty() {
            return None;
        }
        let node = b.map.node(shard);
        let addr = node.addr.as_ref()?;
        let pool_of = |at: &(String, u16)| {
            b.pools.pool(PoolKey { shard, target: self.target(addr, at.clone(), database) }, &node.name)
        };
        use shardmap::config::ReplicaPolicy;
        let pool = match policy {
            ReplicaPolicy::RoundRobin => pool_of(&fresh[b.topology.replica_turn(shard) % fresh.len()]),
            ReplicaPolicy::Random => pool_of(&fresh[rand::random_range(0..fresh.len())]),
            ReplicaPolicy::First => pool_of(&fresh[0]),
            ReplicaPolicy::LeastConn => {
                // Ties (all idle, say) go round: the turn picks where the search starts.
                let start = b.topology.replica_turn(shard);
                (0..fresh.len())
                    .map(|k| pool_of(&fresh[(start + k) % fresh.len()]))
                    .min_by_key(|p| p.in_use())
                    .expect("at least one standby")
            }
        };
        let mut p = pool.get(self.home).await.ok()?;
        self.take_up(&mut p, carry).await.ok()?;
        Some(p)
    }

    /// A connection just checked out becomes this client's: registered for its CancelRequests, with its
    /// session settings replayed when the connection carries others.
    pub async fn take_up(&self, p: &mut Pooled, carry: &(dyn Carry + Sync)) -> Result<(), BackendError> {
        p.register_cancel(&self.cancel);
        if p.conn().prepared.len() > MAX_PREPARED {
            // Statements of old schema epochs and of clients long gone: start again.
            Box::pin(p.conn().run_quiet("DEALLOCATE ALL")).await?;
            p.conn().prepared.clear();
        }
        if p.conn().settings == carry.hash() {
            return Ok(());
        }
        Box::pin(sync_settings(p, carry, None)).await
    }

    /// After a statement could not run on `shard`'s primary of `generation`: waits for another one (the
    /// failover buffer); `e` is what the client gets if none comes.
    pub async fn wait_new_primary(&self, shard: ShardId, generation: u64, e: Reported) -> Result<(), Reported> {
        let b = &self.backends;
        let name = &b.map.node(shard).name;
        tracing::info!(shard = %name, code = %e.code, "{}; waiting for a new primary", e.message);
        match b.topology.changed_from(shard, generation, name).await {
            Ok(()) => Ok(()),
            Err(why) => Err(Reported::new(&e.code, format!("{} ({})", e.message, why.0))),
        }
    }

    /// A statement on `shard` failed: a lost connection counts for the circuit breaker.
    pub fn failed(&self, shard: ShardId, e: &Reported) {
        if e.code.starts_with("08") {
            self.backends.breaker.failure(shard.0 as usize, self.backends.topology.generation(shard));
        }
    }

    /// A statement got its answer from `shard`: metrics, and the circuit breaker's success.
    pub fn answered(&self, shard: ShardId, started: std::time::Instant, error: bool) {
        self.backends.stats.record(shard.0 as usize, started.elapsed(), error);
        self.backends.breaker.success(shard.0 as usize);
    }
}

/// Whether `p` can be handed to a client as it is: it carries the client's settings, and not too many prepared
/// statements (else [`Checkout::take_up`] deallocates them and replays the settings).
fn fits(p: &mut Pooled, carry: &(dyn Carry + Sync)) -> bool {
    let conn = p.conn();
    conn.prepared.len() <= MAX_PREPARED && conn.settings == carry.hash()
}

/// A checkout without an await ([`Checkout::get_now`]).
pub enum Now {
    Got(Pooled),
    Failed(Reported),
    /// Every connection is taken: await this, then [`Checkout::handed`].
    Wait(Wait),
    /// Call [`Checkout::get`].
    Slow,
}

/// A checkout waiting for a connection of a pool whose connections are all taken (see [`pool::Ticket`]).
pub struct Wait {
    ticket: pool::Ticket,
}

/// What a [`Wait`] got.
pub struct Waited {
    got: Result<Pooled, super::pool::PoolError>,
}

impl std::future::Future for Wait {
    type Output = Waited;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Waited> {
        std::pin::Pin::new(&mut self.ticket).poll(cx).map(|got| Waited { got })
    }
}

/// Brings a connection's session settings to `carry`'s when it carries others. The ParameterStatus messages
/// the server sends meanwhile go to `relay` when given (the client's view changes: after a RESET), else
/// nowhere (a replay on checkout restores what the client already knows).
pub async fn sync_settings(
    p: &mut Pooled,
    carry: &(dyn Carry + Sync),
    relay: Option<&mut bytes::BytesMut>,
) -> Result<(), BackendError> {
    let conn = p.conn();
    let want = carry.hash();
    if conn.settings == want {
        return Ok(());
    }
    let sql = carry.replay_sql(conn.settings != 0);
    if !sql.is_empty() {
        crate::net::proto::query(&mut conn.io.wbuf, &sql);
        conn.flush().await?;
        Box::pin(conn.drain_to_ready_relaying(relay)).await?;
    }
    conn.settings = want;
    Ok(())
}
