//! Pools of server connections, one per (shard, database, user). Permits bound each pool at `pool-size`;
//! a checkout waits at most `pool-timeout-ms` and then fails with a clear error. Connections go back only
//! when the server reported idle; anything else is closed, never handed to another client dirty.
//!
//! Under `SHARD_ROUTER_RUNTIME=event-loops` each of the router's single-threaded event loops is a *home* (the
//! default work-stealing runtime is one home). `pool-size` is split into one share of permits per home, and
//! a pool keeps its idle connections in one list per home: a checkout takes its own home's permit and idle
//! connection first, so that a client's session and the server connections it uses stay on one thread (no
//! wake-ups across threads); another home's only when its own has none (the connection's I/O stays
//! registered with the thread that opened it, and it goes back to that thread's list); and a checkout that
//! must wait waits on its own home's share, whose permits come back with its own home's connections. A new
//! connection is made only when no list holds an idle one, so the pool never holds more than `pool-size`.
//!
//! A connection given back while checkouts wait goes to the first of them as it is (with its permit): no
//! idle list, no clock read, no permit given back and taken again. A permit given back without a connection
//! (the connection was closed) goes to the first waiting checkout the same way, which then takes an idle
//! connection or opens one.
//!
//! A client keeps its last connection between transactions (in its [`Parking`]) unless its pool is pressed
//! (its last checkout found no permit free): its next transaction takes it back without a checkout (no
//! permit, no idle list, no clock read). It still
//! counts as idle, and a checkout that finds no free permit takes a kept connection from its client first
//! (before it waits); a client that gives a connection back while others wait hands it over at once. So a
//! kept connection never makes anyone wait: see [`Pool::park`] and [`Pool::steal`]. Nor does it make the pool
//! open more: a checkout that finds no idle connection takes a kept one before it connects, so the pool still
//! opens only as many connections as transactions run at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use shardmap::ShardId;
use tokio::sync::oneshot;

use crate::backend::cancel::{CancelKey, Slot};
use crate::backend::conn::{BackendError, ServerConn, Target};
use crate::net::proto;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub shard: ShardId,
    pub target: Target,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection to shard {shard} became free within {ms} ms (pool-size {size}); raise pool-size or pool-timeout-ms")]
    Timeout { shard: String, ms: u64, size: u32 },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl PoolError {
    pub fn sqlstate(&self) -> &str {
        match self {
            PoolError::Timeout { .. } => "53300",
            PoolError::Backend(e) => e.sqlstate(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub size: u32,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    /// The event loops (homes) whose clients use the pools; fixed at start.
    pub homes: usize,
}

/// [`Settings`] as every pool reads them: the size and the homes fixed at start, the timeouts (which RELOAD
/// changes) in atomics — read on checkouts, where loading a swapped pointer costs more.
struct Shared {
    size: u32,
    homes: usize,
    timeout_ms: AtomicU64,
    idle_timeout_ms: AtomicU64,
}

impl Shared {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.load(Ordering::Relaxed))
    }
}

pub struct Pool {
    key: PoolKey,
    name: String,
    /// Idle connections, one list per home. Boxed: a connection moves (pool → client → pool) with every
    /// transaction, a pointer is cheaper to move.
    #[allow(clippy::vec_box)]
    idle: Box<[Mutex<Vec<Box<ServerConn>>>]>,
    /// `pool-size` in shares, one per home (one share under the default runtime); a home's clients take
    /// their own share's permits first, another's only when theirs are all taken, and wait on their own.
    shares: Box<[Share]>,
    /// Shared by all pools.
    settings: Arc<Shared>,
    /// Checkouts waiting for a free connection now (for metrics), and those about to (a client giving a
    /// connection back reads it: see [`Pool::park`]).
    waiting: AtomicUsize,
    /// Set when the shard's primary moved away from this pool's host: connections are not kept any more.
    retired: AtomicBool,
    /// The clients that keep (or kept) a connection of this pool between transactions; [`Pool::steal`],
    /// the reaper and a retirement look there. A client is listed again when it parks after being dropped.
    /// Kept connections hold a permit and count as idle ([`Pool::parked`]). No counter is kept: a client
    /// taking its own connection back touches nothing other clients' threads write.
    parkings: Mutex<Vec<Weak<Parking>>>,
    /// The list above is not empty (written under its lock): a checkout with no permit or no idle
    /// connection looks there only when set.
    listed: AtomicBool,
    /// The last checkout that looked for a permit found none: more clients want connections than the pool
    /// has, and clients give theirs back rather than keep them (kept ones would only pass from client to
    /// client through `steal`). Cleared by the next checkout that finds a permit free.
    pressed: AtomicBool,
    /// Waiting checkouts' deadlines, with no timer each (see [`Pool::enqueue`]): the earliest of them, in
    /// milliseconds since `born` (`u64::MAX`: none known), which the pool's watchdog compares with the clock
    /// every few milliseconds; when it passed, the watchdog ends the waits past their deadline.
    earliest: AtomicU64,
    /// The watchdog runs (while checkouts wait).
    watching: AtomicBool,
    born: Instant,
    /// ParameterStatus of the first connection made, for clients' startup.
    pub params: Mutex<Option<Vec<(String, String)>>>,
}

/// One home's share of `pool-size`: its permits not taken now, and the checkouts waiting for one, first
/// come first served. A permit is taken without the lock; one is given back under it, to the first waiting
/// checkout, or — none waiting — to `free`. So `free` grows only while no one waits, and a checkout that
/// found it empty under the lock is in the queue before the next permit comes back.
struct Share {
    free: AtomicUsize,
    waiters: Mutex<VecDeque<Waiter>>,
}

impl Share {
    fn take(&self) -> bool {
        self.free.fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
    }
}

/// A checkout waiting for a permit: whoever gives one back hands it over here (with its connection, when it
/// has one), unless the deadline passed (the watchdog drops `to`: the wait ends with a timeout).
struct Waiter {
    to: oneshot::Sender<Pooled>,
    /// In milliseconds since the pool's `born`.
    deadline: u64,
}

/// A waiting checkout's end of its [`Waiter`]. Dropped — the client went away — after a connection was
/// handed over, it gives the connection back rather than close it.
struct Handed(oneshot::Receiver<Pooled>);

impl Drop for Handed {
    fn drop(&mut self) {
        self.0.close();
        if let Ok(p) = self.0.try_recv() {
            p.give_back();
        }
    }
}

/// A checkout waiting for a connection (every permit of its pool was taken): awaited, the permit whoever gave
/// one back handed over — with that connection, or bare when it was closed (see [`Pool::fill`]) — or past
/// `pool-timeout-ms` the timeout. Counted among the pool's waiting checkouts until its wait ends or it is
/// dropped. The session awaits it directly (see `Session::link_now`): a wait is polled again from the
/// session, not through the layers of an `async` checkout.
pub struct Ticket {
    handed: Handed,
    /// The checkout's place in the pool's waiting count, given up when the wait ends (or the ticket is dropped).
    counted: Option<Counted>,
}

impl std::future::Future for Ticket {
    type Output = Result<Pooled, PoolError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let got = std::task::ready!(std::pin::Pin::new(&mut self.handed.0).poll(cx));
        let counted = self.counted.take().expect("a ticket is not polled after its wait ended");
        std::task::Poll::Ready(got.map_err(|_| counted.0.timed_out()))
    }
}

/// What [`Pool::queue`] found.
enum Queued {
    /// A connection kept by a client, or a permit given back since the caller looked (bare).
    Got(Pooled),
    Wait(Ticket),
    /// Nothing, and the caller would not wait.
    Nothing,
}

/// A checkout without an await ([`Pool::take_now`]).
pub enum Now {
    /// A connection (clean; its settings are the caller's to check).
    Got(Pooled),
    /// Every connection is taken: await the ticket.
    Wait(Ticket),
    /// Take the `async` way ([`Pool::get_with`]): a connection is to be opened, or a permit came back as it
    /// was looked for.
    Slow,
}

/// A checked-out connection and the permit it holds. Give it back with [`Pooled::release`]; dropping it
/// closes the connection (the permit goes on to the next waiting checkout). Without a connection (`conn`
/// none) it is a bare permit: a checkout that has one takes an idle connection or opens one.
pub struct Pooled {
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
    /// The home whose idle list the connection goes back to (the thread that opened it).
    home: usize,
    /// The share whose permit this holds...
    share: usize,
    /// ...until it is back in the share (see [`Pool::hand`]).
    holds_permit: bool,
    /// The client's cancel slot this connection is registered in while checked out (and kept by that client).
    cancel: Option<(Arc<Slot>, Arc<CancelKey>)>,
    /// Where the client keeps it between transactions (none: it goes back to the pool).
    parking: Option<Weak<Parking>>,
}

/// A client's place for the one server connection it keeps between transactions (transaction pooling).
/// The client holds it; a pool lists it (weakly) to take the connection back when another client needs it.
#[derive(Default)]
pub struct Parking {
    state: Mutex<Parked>,
    /// The pool whose connection it keeps (its address; 0: none), written under the lock: the client's
    /// checkout looks without locking (only the client itself parks, so it never misses its own).
    holds: AtomicUsize,
}

#[derive(Default)]
struct Parked {
    conn: Option<Pooled>,
    /// The pool whose list names this parking (its address; 0: none), so that it is listed once.
    listed_in: usize,
    /// Reaper rounds seen while parked: past `pool-idle-timeout`'s worth, the connection is closed.
    reaps: u32,
}

impl Parked {
    /// Whether the kept connection is one of the pool at address `pool` (see [`Pool::addr`]).
    fn keeps_of(&self, pool: usize) -> bool {
        self.conn.as_ref().is_some_and(|p| p.pool.addr() == pool)
    }
}

impl Parking {
    /// The kept connection, given back to its pool (the client is leaving).
    pub fn give_back(&self) {
        let p = self.state.lock().expect("parking lock").conn.take();
        self.holds.store(0, Ordering::Relaxed);
        if let Some(p) = p {
            p.give_back();
        }
    }
}

impl Pool {
    /// The pool's address: how a parking names the pool it is listed in or keeps a connection of.
    fn addr(&self) -> usize {
        self as *const Pool as usize
    }

    /// Connections checked out of this pool now.
    pub fn in_use(&self) -> usize {
        (self.settings.size as usize).saturating_sub(self.available() + self.parked())
    }

    pub async fn get(self: &Arc<Self>, home: usize) -> Result<Pooled, PoolError> {
        Ok(self.get_with(true, home).await?.expect("a checkout that waits gets a connection or an error"))
    }

    /// A checkout for a client of `home`; `wait: false`: `None` at once when every connection is taken (no
    /// waiting).
    pub async fn get_with(self: &Arc<Self>, wait: bool, home: usize) -> Result<Option<Pooled>, PoolError> {
        // A free permit is taken without setting up a timer; only a wait is bounded by pool-timeout-ms.
        let own = self.share_of(home);
        let permit = match self.free_permit(own, home) {
            Some(p) => p,
            None => match self.queue(own, home, wait) {
                Queued::Got(p) => p,
                // (Not boxed: the ticket is small — its channel's receiving end and a few words.)
                Queued::Wait(ticket) => ticket.await?,
                Queued::Nothing => return Ok(None),
            },
        };
        self.fill(permit, home).await.map(Some)
    }

    /// A checkout without an await, for a client of `home`: a free permit and an idle connection; with every
    /// permit taken, a connection kept by a client, or a place in the queue of those waiting (a [`Ticket`] to
    /// await). [`Now::Slow`]: a free permit but no idle connection — nothing taken, [`Pool::get_with`]
    /// connects.
    pub fn take_now(self: &Arc<Self>, home: usize) -> Now {
        let own = self.share_of(home);
        let Some(mut permit) = self.free_permit(own, home) else {
            return match self.queue(own, home, true) {
                Queued::Got(p) if p.conn.is_some() => Now::Got(p),
                // (A permit given back since: it goes on as it is dropped, and the checkout takes the slow path.)
                Queued::Got(_) | Queued::Nothing => Now::Slow,
                Queued::Wait(ticket) => Now::Wait(ticket),
            };
        };
        match self.idle_conn(home % self.idle.len()) {
            Some((conn, home)) => {
                permit.conn = Some(conn);
                permit.home = home;
                Now::Got(permit)
            }
            None => Now::Slow,
        }
    }

    /// Every permit of the pool is taken (the caller looked): a connection kept by a client, else (`wait`) a
    /// place in the queue of share `share` — or the permit given back since the caller looked, bare.
    fn queue(self: &Arc<Self>, share: usize, home: usize, wait: bool) -> Queued {
        if !self.pressed.load(Ordering::Relaxed) {
            self.pressed.store(true, Ordering::Relaxed);
        }
        // Counted as waiting before looking for a kept connection: a client parking one from now on hands it
        // over instead (see `park`). Uncounted when this ends without a wait; a ticket uncounts itself when
        // its wait ends or it is dropped mid-wait (a count left behind would stop every client from keeping
        // its connection).
        let counted = Waiting::count(&self.waiting);
        if self.listed.load(Ordering::SeqCst) {
            if let Some(p) = self.steal() {
                return Queued::Got(p);
            }
        }
        if !wait {
            return Queued::Nothing;
        }
        match self.enqueue(share, home) {
            Ok(permit) => Queued::Got(permit),
            Err(handed) => Queued::Wait(Ticket { handed, counted: Some(counted.keep(self.clone())) }),
        }
    }

    /// A permit taken (the caller's: free, or handed over — with a connection, or bare) with a connection:
    /// its own, an idle one, one kept by a client (its permit goes on), or a new one.
    pub async fn fill(self: &Arc<Self>, mut permit: Pooled, home: usize) -> Result<Pooled, PoolError> {
        if permit.conn.is_some() {
            // Handed over by the client that gave it back.
            return Ok(permit);
        }
        let home = home % self.idle.len();
        let idle = self.idle_conn(home);
        if idle.is_none() && self.listed.load(Ordering::SeqCst) {
            // No idle connection, but a client keeps one: taken rather than a new one opened (so the pool opens
            // as many connections as transactions run at once, as without keeping; the permit goes on).
            if let Some(kept) = self.steal() {
                return Ok(kept);
            }
        }
        let (conn, home) = match idle {
            Some(c) => c,
            None => {
                // Boxed: a connect is rare and its future is large; inline it would be copied on every checkout.
                let c = Box::pin(ServerConn::connect(&self.key.target, self.settings.timeout())).await?;
                let mut params = self.params.lock().expect("pool lock");
                if params.is_none() {
                    *params = Some(c.params.clone());
                }
                (Box::new(c), home)
            }
        };
        permit.conn = Some(conn);
        permit.home = home;
        Ok(permit)
    }

    /// The error of a checkout that waited `pool-timeout-ms` for a connection.
    fn timed_out(&self) -> PoolError {
        PoolError::Timeout {
            shard: self.name.clone(),
            ms: self.settings.timeout_ms.load(Ordering::Relaxed),
            size: self.settings.size,
        }
    }

    /// A permit of share `share`, for a client of `home`, with no connection yet.
    fn bare(self: &Arc<Self>, share: usize, home: usize) -> Pooled {
        Pooled {
            conn: None,
            pool: self.clone(),
            home: home % self.idle.len(),
            share,
            holds_permit: true,
            cancel: None,
            parking: None,
        }
    }

    /// A free permit (share `own` first), if there is one; the pool is not pressed any more then.
    fn free_permit(self: &Arc<Self>, own: usize, home: usize) -> Option<Pooled> {
        let n = self.shares.len();
        let share = (0..n).map(|k| (own + k) % n).find(|&k| self.shares[k].take())?;
        if self.pressed.load(Ordering::Relaxed) {
            self.pressed.store(false, Ordering::Relaxed);
        }
        Some(self.bare(share, home))
    }

    /// Gives `p` back: to the first checkout waiting on its share, as it is (a connection with its permit, or a
    /// bare permit); with none waiting, its connection to its home's idle list and its permit to the share.
    /// (The caller checked that the connection is clean.)
    fn hand(mut p: Pooled) {
        p.parking = None;
        if let Some((slot, key)) = p.cancel.take() {
            slot.remove(&key);
        }
        loop {
            let share = &p.pool.shares[p.share];
            let mut waiters = share.waiters.lock().expect("pool lock");
            let Some(w) = waiters.pop_front() else {
                if let Some(mut c) = p.conn.take() {
                    c.idle_rounds = 0;
                    p.pool.idle[p.home].lock().expect("pool lock").push(c);
                }
                share.free.fetch_add(1, Ordering::Release);
                p.holds_permit = false;
                return;
            };
            drop(waiters);
            // (A checkout gone since — its client left, its deadline passed — gives `p` back to try the next.)
            match w.to.send(p) {
                Ok(()) => return,
                Err(back) => p = back,
            }
        }
    }

    /// The connection `parking` keeps, if it is one of this pool's (the client's next transaction).
    #[inline]
    pub fn unpark(&self, parking: &Parking) -> Option<Pooled> {
        if parking.holds.load(Ordering::Relaxed) != self.addr() {
            return None;
        }
        self.take_kept(parking)
    }

    /// [`Pool::unpark`] past its look without the lock (a closed pool's connection is closed here).
    fn take_kept(&self, parking: &Parking) -> Option<Pooled> {
        let me = self.addr();
        let mut s = parking.state.lock().expect("parking lock");
        if !s.keeps_of(me) {
            return None;
        }
        let p = s.conn.take();
        parking.holds.store(0, Ordering::Relaxed);
        drop(s);
        p.filter(|_| !self.retired.load(Ordering::Acquire))
    }

    /// A client keeps `p`, clean, in `parking` for its next transaction; the connection it kept before goes
    /// back. If a checkout waits (or is about to) for this pool, `p` goes back to the pool instead: with
    /// `steal`, whose checkout counts itself waiting before it looks at the kept connections, either that
    /// checkout finds `p` or this sees it waiting — a kept connection never leaves anyone waiting. (A listed
    /// client's entry keeps `listed` set; one that lists itself sets it before it reads the waiting count.)
    ///
    /// A client already listed (every transaction but its first) reads the waiting count while it holds its
    /// parking's lock, through the connection it just put there: no reference to the pool is taken (a
    /// reference count every client's thread bumps on every transaction would pass its cache line from core
    /// to core).
    fn park(parking: &Arc<Parking>, p: Pooled) {
        let me = p.pool.addr();
        let (before, back, to_list) = {
            let mut s = parking.state.lock().expect("parking lock");
            let before = s.conn.replace(p);
            parking.holds.store(me, Ordering::Relaxed);
            s.reaps = 0;
            if s.listed_in == me {
                fence(Ordering::SeqCst);
                let pool = &s.conn.as_ref().expect("just kept").pool;
                let back = if pool.waiting.load(Ordering::SeqCst) > 0 {
                    parking.holds.store(0, Ordering::Relaxed);
                    s.conn.take()
                } else {
                    None
                };
                (before, back, None)
            } else {
                s.listed_in = me;
                (before, None, Some(s.conn.as_ref().expect("just kept").pool.clone()))
            }
        };
        if let Some(b) = before {
            b.give_back();
        }
        if let Some(b) = back {
            b.give_back();
        }
        if let Some(pool) = to_list {
            let mut parkings = pool.parkings.lock().expect("pool lock");
            if parkings.len() >= 16 && parkings.len() == parkings.capacity() {
                // (Clients gone or parking elsewhere now: dropped before the list grows.)
                parkings.retain(|w| w.upgrade().is_some_and(|k| k.state.lock().expect("parking lock").listed_in == me));
            }
            parkings.push(Arc::downgrade(parking));
            pool.listed.store(true, Ordering::SeqCst);
            drop(parkings);
            fence(Ordering::SeqCst);
            if pool.waiting.load(Ordering::SeqCst) > 0 {
                if let Some(p) = pool.unpark(parking) {
                    p.give_back();
                }
            }
        }
    }

    /// A connection kept by a client between its transactions, taken for another client (every permit is
    /// taken). Clients found keeping none (they are in a transaction now) are dropped from the list; they
    /// list themselves again when they park.
    fn steal(&self) -> Option<Pooled> {
        let me = self.addr();
        let mut parkings = self.parkings.lock().expect("pool lock");
        let mut got = None;
        parkings.retain(|w| {
            if got.is_some() {
                return true;
            }
            let Some(k) = w.upgrade() else { return false };
            let mut s = k.state.lock().expect("parking lock");
            if s.listed_in != me {
                return false;
            }
            s.listed_in = 0;
            if s.keeps_of(me) {
                got = s.conn.take();
                k.holds.store(0, Ordering::Relaxed);
            }
            false
        });
        if parkings.is_empty() {
            self.listed.store(false, Ordering::SeqCst);
        }
        drop(parkings);
        let mut p = got?;
        p.parking = None;
        if let Some((slot, key)) = p.cancel.take() {
            slot.remove(&key);
        }
        Some(p)
    }

    /// Takes every connection kept by clients that `close` selects (by the reaper rounds it has seen, after
    /// counting this one); the list keeps only the clients still keeping one of this pool's.
    fn take_parked(&self, mut close: impl FnMut(u32) -> bool) -> Vec<Pooled> {
        let me = self.addr();
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut parkings = self.parkings.lock().expect("pool lock");
        parkings.retain(|w| {
            // (A client listed twice — it kept another pool's connection in between — is counted once.)
            if !seen.insert(Weak::as_ptr(w) as usize) {
                return false;
            }
            let Some(k) = w.upgrade() else { return false };
            let mut s = k.state.lock().expect("parking lock");
            if s.listed_in != me {
                return false;
            }
            if !s.keeps_of(me) {
                s.listed_in = 0;
                return false;
            }
            s.reaps += 1;
            if !close(s.reaps) {
                return true;
            }
            s.listed_in = 0;
            out.extend(s.conn.take());
            k.holds.store(0, Ordering::Relaxed);
            false
        });
        if parkings.is_empty() {
            self.listed.store(false, Ordering::SeqCst);
        }
        out
    }

    /// Connections of this pool its clients keep now (for the figures: it looks at each listed client).
    fn parked(&self) -> usize {
        let me = self.addr();
        let parkings = self.parkings.lock().expect("pool lock");
        let mut seen = std::collections::HashSet::new();
        parkings
            .iter()
            .filter(|w| seen.insert(Weak::as_ptr(w) as usize))
            .filter_map(Weak::upgrade)
            .filter(|k| k.state.lock().expect("parking lock").keeps_of(me))
            .count()
    }

    /// The most recently used idle connection of `home`, else of another home (with the home it is from); the
    /// reaper closes old ones (see [`Pools::reap`]: no clock is read here).
    fn idle_conn(&self, home: usize) -> Option<(Box<ServerConn>, usize)> {
        let n = self.idle.len();
        (0..n).map(|k| (home + k) % n).find_map(|h| self.idle[h].lock().expect("pool lock").pop().map(|c| (c, h)))
    }

    /// The share a client of `home` waits on: its own, or (more homes than `pool-size`: a home without a
    /// share) another's.
    fn share_of(&self, home: usize) -> usize {
        if self.shares.len() == 1 {
            return 0;
        }
        let h = home % self.shares.len();
        // (Home h has a share of its own exactly when h < pool-size: see `shares`.)
        let size = (self.settings.size as usize).max(1);
        if h < size {
            h
        } else {
            h % size
        }
    }

    /// Permits free in all shares.
    fn available(&self) -> usize {
        self.shares.iter().map(|s| s.free.load(Ordering::Relaxed)).sum()
    }

    fn idle_len(&self) -> usize {
        self.idle.iter().map(|l| l.lock().expect("pool lock").len()).sum()
    }
}

impl Pool {
    /// The slow path of a checkout: every connection is taken (none kept by a client); a place in the queue
    /// of share `share`, whose [`Handed`] end gets the permit whoever gives one back hands over — with its
    /// connection when it has one — or is closed past `pool-timeout-ms` (see [`Ticket`]). `Ok`: a permit
    /// given back since the caller looked, bare.
    ///
    /// No timer is set up for each wait (registering one in the runtime's timer wheel and removing it cost
    /// more than the rest of the checkout): the checkout notes its deadline in its place in the queue and in
    /// `earliest`; the pool's watchdog (one task, running while checkouts wait) looks at the queue when the
    /// earliest deadline has passed and ends the waits past theirs. A checkout is told within one watchdog
    /// tick (1/20 of pool-timeout-ms, 1 to 250 ms) after its deadline. The watchdog resets `earliest` before
    /// it looks, and notes again the deadlines it leaves in the queue; a checkout notes its own under the
    /// queue's lock: no deadline goes unnoted. (The caller counts itself waiting first: see `watch`.)
    fn enqueue(self: &Arc<Self>, share: usize, home: usize) -> Result<Pooled, Handed> {
        let timeout = self.settings.timeout();
        // (+1: the clock counts whole milliseconds, and a wait ends after pool-timeout-ms, never before.)
        let deadline = self.clock().saturating_add(timeout.as_millis() as u64 + 1);
        let (to, handed) = oneshot::channel();
        {
            let mut waiters = self.shares[share].waiters.lock().expect("pool lock");
            if self.shares[share].take() {
                // (Given back since the caller looked.)
                drop(waiters);
                return Ok(self.bare(share, home));
            }
            waiters.push_back(Waiter { to, deadline });
            self.earliest.fetch_min(deadline, Ordering::SeqCst);
        }
        self.watch();
        Err(Handed(handed))
    }

    /// Ends the waits past their deadline (their checkouts time out) and of checkouts gone, and notes the
    /// earliest deadline left.
    fn expire(&self) {
        let now = self.clock();
        for share in self.shares.iter() {
            let mut next = u64::MAX;
            share.waiters.lock().expect("pool lock").retain(|w| {
                let keep = w.deadline > now && !w.to.is_closed();
                if keep {
                    next = next.min(w.deadline);
                }
                keep
            });
            self.earliest.fetch_min(next, Ordering::SeqCst);
        }
    }

    /// Milliseconds since the pool was made.
    fn clock(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Starts the watchdog unless it runs. (The caller counts itself in `waiting` first: a watchdog that
    /// finds no one waiting stops, then looks again, so that one of the two sees the other.)
    fn watch(self: &Arc<Self>) {
        if !self.watching.swap(true, Ordering::SeqCst) {
            tokio::spawn(self.clone().watchdog());
        }
    }

    /// Ends waits past their deadline (see [`Pool::expire`]) when the earliest has passed; stops when no
    /// checkout waits.
    async fn watchdog(self: Arc<Self>) {
        // (Dropped unfinished — the runtime it ran on shut down — it clears `watching`, so that the next
        // waiting checkout starts another rather than wait for ever.)
        let mut running = Running(&self.watching, true);
        loop {
            let tick = (self.settings.timeout() / 20).clamp(Duration::from_millis(1), Duration::from_millis(250));
            tokio::time::sleep(tick).await;
            if self.clock() >= self.earliest.load(Ordering::SeqCst) {
                self.earliest.store(u64::MAX, Ordering::SeqCst);
                self.expire();
            }
            if self.waiting.load(Ordering::SeqCst) == 0 {
                running.1 = false;
                self.watching.store(false, Ordering::SeqCst);
                if self.waiting.load(Ordering::SeqCst) == 0 || self.watching.swap(true, Ordering::SeqCst) {
                    return;
                }
                running.1 = true;
            }
        }
    }
}

/// A running watchdog's mark on its pool's `watching`, cleared if the watchdog is dropped while it runs.
struct Running<'a>(&'a AtomicBool, bool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.store(false, Ordering::SeqCst);
        }
    }
}

/// A checkout counted in its pool's `waiting` until this is dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a AtomicUsize) -> Waiting<'a> {
        waiting.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        Waiting(waiting)
    }
}

impl Waiting<'_> {
    /// The count kept past this borrow, by a checkout that waits (its [`Ticket`]): never uncounted in between,
    /// when a client parking its connection could keep it instead of handing it over.
    fn keep(self, pool: Arc<Pool>) -> Counted {
        std::mem::forget(self);
        Counted(pool)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A [`Waiting`] count owned by a ticket: uncounted when dropped.
struct Counted(Arc<Pool>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A pool's figures for metrics and the health endpoint.
pub struct PoolStat {
    pub shard: ShardId,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub active: usize,
    pub idle: usize,
    pub waiting: usize,
}

impl Pooled {
    pub fn conn(&mut self) -> &mut ServerConn {
        self.conn.as_mut().expect("present until released")
    }

    /// Registers the connection in a client's cancel slot until it goes back to the pool, to another client
    /// or is closed. A connection its client kept between transactions (see [`Pool::park`]) stays
    /// registered while kept (a cancel reaching an idle server is ignored), so taking it back costs nothing.
    pub fn register_cancel(&mut self, slot: &Arc<Slot>) {
        if let Some((held, key)) = &self.cancel {
            if Arc::ptr_eq(held, slot) {
                return;
            }
            held.remove(key);
        }
        let key = self.conn.as_ref().expect("present until released").cancel_key.clone();
        slot.add(key.clone());
        self.cancel = Some((slot.clone(), key));
    }

    /// A bare permit (handed over after its connection was closed): [`Pool::fill`] gives it one.
    pub fn is_bare(&self) -> bool {
        self.conn.is_none()
    }

    /// The pool the connection (or permit) is of.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Whether the connection belongs to `pool`.
    pub fn is_from(&self, pool: &Arc<Pool>) -> bool {
        Arc::ptr_eq(&self.pool, pool)
    }

    /// The status of the connection's last ReadyForQuery.
    pub fn conn_status(&self) -> u8 {
        self.conn.as_ref().map_or(crate::net::proto::READY_FAILED, |c| c.status)
    }

    pub fn shard(&self) -> ShardId {
        self.pool.key.shard
    }

    /// A client's connection kept between its transactions (see [`Pool::park`]) from now on.
    pub fn keep_in(&mut self, parking: &Arc<Parking>) {
        self.parking = Some(Arc::downgrade(parking));
    }

    /// Returns the connection to its pool if the server said it is idle (or to its client's parking, when it
    /// has one and the pool is not pressed: its last checkout found a permit free); otherwise closes it.
    pub fn release(mut self) {
        if let Some(parking) = self.parking.take().and_then(|w| w.upgrade()) {
            if self.is_clean() && !self.pool.pressed.load(Ordering::Relaxed) {
                // (Still registered for the client's cancels: see `register_cancel`.)
                self.parking = Some(Arc::downgrade(&parking));
                Pool::park(&parking, self);
                return;
            }
        }
        self.give_back();
    }

    /// Idle on the server, nothing unread, and its pool still in use.
    #[inline]
    fn is_clean(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| {
            c.status == proto::READY_IDLE && c.io.buffered() == 0 && !self.pool.retired.load(Ordering::Acquire)
        })
    }

    /// Back to the first checkout waiting, else to the pool's idle list, if clean; otherwise closed (its
    /// permit goes on).
    #[inline]
    fn give_back(mut self) {
        if !self.is_clean() {
            self.conn = None;
        }
        Pool::hand(self);
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some((slot, key)) = self.cancel.take() {
            slot.remove(&key);
        }
        if self.holds_permit {
            // Not given back: the connection (if any) is closed, and its permit goes on.
            self.conn = None;
            self.holds_permit = false;
            Pool::hand(self.pool.bare(self.share, self.home));
        }
    }
}

/// All pools of a router.
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// Shared by all pools; RELOAD changes the timeouts (the size stays: it is fixed at start).
    settings: Arc<Shared>,
}

impl Pools {
    pub fn new(settings: Settings) -> Pools {
        let Settings { size, timeout, idle_timeout, homes } = settings;
        let settings = Shared {
            size,
            homes,
            timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
            idle_timeout_ms: AtomicU64::new(idle_timeout.as_millis() as u64),
        };
        Pools { pools: Mutex::new(HashMap::new()), settings: Arc::new(settings) }
    }

    /// Closes idle connections older than `pool-idle-timeout`, in every pool. An idle connection has no clock
    /// (reading one per transaction costs), in the pool's list or kept by its client: it is closed once this
    /// has run, every [`Pools::reap_every`], more times than fit in `pool-idle-timeout` — idle at least that
    /// long, at most one round more.
    pub fn reap(&self) {
        let pools: Vec<Arc<Pool>> = self.pools.lock().expect("pools lock").values().cloned().collect();
        let cutoff = self.settings.idle_timeout();
        let rounds = cutoff.as_millis().div_ceil(self.reap_every().as_millis().max(1)) as u32;
        for p in pools {
            for list in p.idle.iter() {
                list.lock().expect("pool lock").retain_mut(|c| {
                    c.idle_rounds += 1;
                    c.idle_rounds <= rounds
                });
            }
            drop(p.take_parked(|seen| seen > rounds));
        }
    }

    /// After a shard's primary changed: its pools for other hosts leave the map and their idle connections
    /// are closed (connections checked out now are closed when given back: their pool is no longer found).
    pub fn retire(&self, shard: ShardId, keep: Option<&(String, u16)>) {
        let mut pools = self.pools.lock().expect("pools lock");
        let gone: Vec<PoolKey> = pools
            .keys()
            .filter(|k| k.shard == shard && keep.is_none_or(|(h, p)| k.target.host != *h || k.target.port != *p))
            .cloned()
            .collect();
        for k in gone {
            if let Some(p) = pools.remove(&k) {
                p.retired.store(true, Ordering::Release);
                for list in p.idle.iter() {
                    list.lock().expect("pool lock").clear();
                }
                drop(p.take_parked(|_| true));
            }
        }
    }

    /// RELOAD: new `pool-timeout-ms` and `pool-idle-timeout` for every pool.
    pub fn update(&self, timeout: Duration, idle_timeout: Duration) {
        self.settings.timeout_ms.store(timeout.as_millis() as u64, Ordering::Relaxed);
        self.settings.idle_timeout_ms.store(idle_timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// How often `reap` should run.
    pub fn reap_every(&self) -> Duration {
        (self.settings.idle_timeout() / 2).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Every pool's figures.
    pub fn stats(&self) -> Vec<PoolStat> {
        let pools: Vec<Arc<Pool>> = self.pools.lock().expect("pools lock").values().cloned().collect();
        pools
            .iter()
            .map(|p| PoolStat {
                shard: p.key.shard,
                host: p.key.target.host.clone(),
                port: p.key.target.port,
                database: p.key.target.database.clone(),
                user: p.key.target.user.clone(),
                active: p.in_use(),
                idle: p.idle_len() + p.parked(),
                waiting: p.waiting.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Idle connections in all pools (for tests and, later, metrics).
    pub fn idle_count(&self) -> usize {
        let pools: Vec<Arc<Pool>> = self.pools.lock().expect("pools lock").values().cloned().collect();
        pools.iter().map(|p| p.idle_len() + p.parked()).sum()
    }

    pub fn pool(&self, key: PoolKey, name: &str) -> Arc<Pool> {
        let mut pools = self.pools.lock().expect("pools lock");
        pools
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Pool {
                    key,
                    name: name.to_string(),
                    idle: (0..self.settings.homes.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
                    shares: {
                        let s = &self.settings;
                        shares(s.size as usize, s.homes.max(1))
                            .into_iter()
                            .map(|free| Share { free: AtomicUsize::new(free), waiters: Mutex::default() })
                            .collect()
                    },
                    settings: self.settings.clone(),
                    params: Mutex::new(None),
                    retired: Default::default(),
                    waiting: Default::default(),
                    parkings: Default::default(),
                    listed: Default::default(),
                    pressed: Default::default(),
                    earliest: AtomicU64::new(u64::MAX),
                    watching: Default::default(),
                    born: Instant::now(),
                })
            })
            .clone()
    }
}

/// `size` split over `homes` shares as evenly as can be (the first ones get the remainder).
fn shares(size: usize, homes: usize) -> Vec<usize> {
    (0..homes).map(|i| size / homes + usize::from(i < size % homes)).collect()
}

impl From<PoolError> for crate::net::Reported {
    fn from(e: PoolError) -> Self {
        crate::net::Reported { code: e.sqlstate().to_string(), message: e.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_size_is_split_over_homes() {
        assert_eq!(shares(20, 1), vec![20]);
        assert_eq!(shares(20, 2), vec![10, 10]);
        assert_eq!(shares(5, 2), vec![3, 2]);
        // More homes than connections: the first ones get one each, the others none (they borrow).
        assert_eq!(shares(3, 4), vec![1, 1, 1, 0]);
        assert_eq!(shares(3, 4).iter().sum::<usize>(), 3);
    }

    fn pool_of_none(timeout: Duration) -> Arc<Pool> {
        let pools = Pools::new(Settings { size: 0, timeout, idle_timeout: Duration::from_secs(60), homes: 1 });
        let target = Target {
            host: "127.0.0.1".into(),
            port: 1,
            user: "u".into(),
            password: None,
            database: "d".into(),
            tls: Default::default(),
        };
        pools.pool(PoolKey { shard: ShardId(0), target }, "s0")
    }

    /// A watchdog dropped with the runtime it ran on leaves no pool without one: a later wait on another
    /// runtime still ends at its deadline.
    #[test]
    fn a_watchdog_dropped_with_its_runtime_is_replaced() {
        let pool = pool_of_none(Duration::from_millis(100));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        rt.block_on(async {
            assert!(tokio::time::timeout(Duration::from_millis(20), pool.get(0)).await.is_err());
        });
        drop(rt);
        assert!(!pool.watching.load(Ordering::SeqCst), "the dropped watchdog let go of the pool");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let t = Instant::now();
        let r = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), pool.get(0)).await });
        let e = r.expect("a wait that ends").err().expect("a timeout");
        assert_eq!(e.sqlstate(), "53300");
        assert!(t.elapsed() >= Duration::from_millis(100) && t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    /// Checkouts that wait time out after pool-timeout-ms — not before, and within a watchdog tick or two
    /// after — with no timer of their own; the watchdog stops when none waits and starts again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waits_end_at_the_timeout_without_a_timer_each() {
        let timeout = Duration::from_millis(200);
        let pool = pool_of_none(timeout);
        for round in 0..2 {
            let start = Instant::now();
            let waits: Vec<_> = (0..50)
                .map(|k| {
                    let pool = pool.clone();
                    tokio::spawn(async move {
                        // (Staggered: deadlines differ, so that the watchdog rings more than once.)
                        tokio::time::sleep(Duration::from_millis(k)).await;
                        let t = Instant::now();
                        let r = pool.get(0).await;
                        (r.err().map(|e| e.sqlstate().to_string()), t.elapsed())
                    })
                })
                .collect();
            for w in waits {
                let (code, waited) = w.await.expect("a checkout");
                assert_eq!(code.as_deref(), Some("53300"), "round {round}");
                assert!(waited >= timeout, "round {round}: ended early, after {waited:?}");
                assert!(waited < timeout + Duration::from_millis(150), "round {round}: ended late, after {waited:?}");
            }
            assert!(start.elapsed() < Duration::from_secs(2));
            assert_eq!(pool.waiting.load(Ordering::SeqCst), 0);
            // The watchdog stops once no one waits (the next round starts it again).
            for _ in 0..100 {
                if !pool.watching.load(Ordering::SeqCst) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(!pool.watching.load(Ordering::SeqCst), "round {round}: the watchdog stopped");
        }
    }
}
