//! `router-rate-limit-*`: statements per user and per tenant, a token bucket each. A bucket holds at most
//! `router-rate-limit-burst` tokens and fills at `router-rate-limit-statements` per
//! `router-rate-limit-window-s`; every statement takes one from its user's bucket and, when the session has a
//! tenant, one from the tenant's. A statement that finds either empty is refused with SQLSTATE 53400
//! (`configuration_limit_exceeded`) naming the key, before it is routed: nothing runs, the session goes on.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use shardmap::config::RateLimit;

use crate::net::Reported;

/// Buckets beyond this many are swept of full ones (keys not used for a while) when a new one is made.
const SWEEP_ABOVE: usize = 4096;

#[derive(Default)]
pub struct RateLimits {
    /// The buckets of users and of tenants (indexed by `Kind`), looked up by a borrowed name: a statement
    /// allocates nothing once its buckets exist.
    buckets: Mutex<[HashMap<String, Bucket>; 2]>,
}

/// The kind of a bucket (its index in `RateLimits::buckets` and `Stats::rate_limited`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    User = 0,
    Tenant = 1,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant, limit: &RateLimit) {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * limit.per_second();
        self.tokens = (self.tokens + earned).min(limit.capacity());
        self.at = now;
    }
}

impl RateLimits {
    /// Takes one statement from the bucket of each key, or refuses (taking nothing) naming the first key
    /// whose bucket is empty, with its kind. `limit.statements == 0`: no limit.
    pub fn take(&self, keys: &[(Kind, &str)], limit: &RateLimit) -> Result<(), (Kind, Reported)> {
        if limit.statements == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        for map in buckets.iter_mut().filter(|m| m.len() > SWEEP_ABOVE) {
            map.retain(|_, b| {
                b.refill(now, limit);
                b.tokens < limit.capacity()
            });
        }
        for &(kind, name) in keys {
            let map = &mut buckets[kind as usize];
            if !map.contains_key(name) {
                map.insert(name.to_string(), Bucket { tokens: limit.capacity(), at: now });
            }
            let b = map.get_mut(name).expect("inserted above");
            b.refill(now, limit);
            if b.tokens < 1.0 {
                let what = match kind {
                    Kind::User => "user",
                    Kind::Tenant => "tenant",
                };
                return Err((kind, Reported::new(
                    "53400",
                    format!(
                        "rate limit exceeded for {what} \"{name}\": {} statements per {} s (router-rate-limit-statements, router-rate-limit-window-s), bursts of {} (router-rate-limit-burst); try again later",
                        limit.statements,
                        limit.window_s.max(1),
                        limit.capacity()
                    ),
                )));
            }
        }
        for &(kind, name) in keys {
            if let Some(b) = buckets[kind as usize].get_mut(name) {
                b.tokens -= 1.0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let r = RateLimits::default();
        let limit = RateLimit { statements: 1000, window_s: 1, burst: 5 };
        let keys = [(Kind::User, "bot")];
        for _ in 0..5 {
            r.take(&keys, &limit).unwrap();
        }
        let (kind, e) = r.take(&keys, &limit).unwrap_err();
        assert_eq!((kind, e.code.as_str()), (Kind::User, "53400"));
        assert!(e.message.contains("user \"bot\""), "{}", e.message);
        std::thread::sleep(std::time::Duration::from_millis(20));
        // 1000/s for 20 ms: about 20 statements earned, 5 kept.
        for _ in 0..5 {
            r.take(&keys, &limit).unwrap();
        }
        assert!(r.take(&keys, &limit).is_err());
    }

    #[test]
    fn an_empty_tenant_takes_nothing_from_the_user() {
        let r = RateLimits::default();
        let limit = RateLimit { statements: 1, window_s: 3600, burst: 2 };
        r.take(&[(Kind::Tenant, "acme")], &limit).unwrap();
        r.take(&[(Kind::Tenant, "acme")], &limit).unwrap();
        let (_, e) = r.take(&[(Kind::User, "bot"), (Kind::Tenant, "acme")], &limit).unwrap_err();
        assert!(e.message.contains("tenant \"acme\""), "{}", e.message);
        // The user's bucket was not charged by the refused statement.
        r.take(&[(Kind::User, "bot")], &limit).unwrap();
        r.take(&[(Kind::User, "bot")], &limit).unwrap();
        assert!(r.take(&[(Kind::User, "bot")], &limit).is_err());
    }

    #[test]
    fn no_limit_by_default() {
        let r = RateLimits::default();
        let limit = RateLimit { statements: 0, window_s: 1, burst: 0 };
        for _ in 0..10_000 {
            r.take(&[(Kind::User, "bot")], &limit).unwrap();
        }
    }
}
