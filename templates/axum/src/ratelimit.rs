//! Per-key, per-endpoint rate limits over a rolling window (a sliding log: exact counts).
//! In-process by default; in Redis (REDIS_URL) so that several instances share them, with one
//! Lua script per acquire, keyed by key id and endpoint, timed by the Redis server's clock.
//! A slot taken by a call that is then refused (insufficient balance) is released, so only
//! charged calls count.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use redis::aio::ConnectionManager;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    Allowed,
    Limited { retry_after_seconds: u64 },
}

pub enum RateLimiter {
    Local(LocalLimiter),
    Redis(RedisLimiter),
}

impl RateLimiter {
    pub fn local() -> Self {
        RateLimiter::Local(LocalLimiter::default())
    }

    /// Connects to Redis; `prefix` namespaces every key this gateway writes.
    pub async fn redis(url: &str, prefix: &str) -> redis::RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(RateLimiter::Redis(RedisLimiter { conn, prefix: prefix.to_string(), script: redis::Script::new(ACQUIRE_LUA) }))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            RateLimiter::Local(_) => "in-process",
            RateLimiter::Redis(_) => "redis",
        }
    }

    /// Takes one slot of `limit` per `window_ms` in `bucket`, tagged `token` (for release).
    pub async fn acquire(&self, bucket: &str, limit: u32, window_ms: u64, token: &str) -> Result<Acquire, String> {
        match self {
            RateLimiter::Local(l) => Ok(l.acquire(bucket, limit, window_ms, token)),
            RateLimiter::Redis(r) => r.acquire(bucket, limit, window_ms, token).await.map_err(|e| e.to_string()),
        }
    }

    /// Gives back the slot taken with `token` (best effort).
    pub async fn release(&self, bucket: &str, token: &str) {
        match self {
            RateLimiter::Local(l) => l.release(bucket, token),
            RateLimiter::Redis(r) => {
                let mut conn = r.conn.clone();
                let key = format!("{}{}", r.prefix, bucket);
                let res: redis::RedisResult<i64> = redis::cmd("ZREM").arg(&key).arg(token).query_async(&mut conn).await;
                if let Err(e) = res {
                    tracing::warn!(error = %e, "rate limit release failed");
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------ in-process

#[derive(Default)]
pub struct LocalLimiter {
    inner: Mutex<LocalState>,
}

#[derive(Default)]
struct LocalState {
    buckets: HashMap<String, VecDeque<(u64, String)>>,
    ops: u64,
    epoch: Option<Instant>,
}

impl LocalLimiter {
    fn now_ms(state: &mut LocalState) -> u64 {
        state.epoch.get_or_insert_with(Instant::now).elapsed().as_millis() as u64 + 1
    }

    fn acquire(&self, bucket: &str, limit: u32, window_ms: u64, token: &str) -> Acquire {
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Self::now_ms(&mut st);
        st.ops += 1;
        if st.ops.is_multiple_of(4096) {
            // Forget idle buckets so memory stays bounded by the active keys.
            st.buckets.retain(|_, q| q.back().is_some_and(|(t, _)| t + window_ms > now));
        }
        let q = st.buckets.entry(bucket.to_string()).or_default();
        while q.front().is_some_and(|(t, _)| t + window_ms <= now) {
            q.pop_front();
        }
        if q.len() >= limit as usize {
            let oldest = q.front().map(|(t, _)| *t).unwrap_or(now);
            let wait = oldest + window_ms - now;
            return Acquire::Limited { retry_after_seconds: wait.div_ceil(1000).max(1) };
        }
        q.push_back((now, token.to_string()));
        Acquire::Allowed
    }

    fn release(&self, bucket: &str, token: &str) {
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = st.buckets.get_mut(bucket)
            && let Some(i) = q.iter().position(|(_, t)| t == token)
        {
            q.remove(i);
        }
    }
}

// ------------------------------------------------------------------------------ Redis

pub struct RedisLimiter {
    conn: ConnectionManager,
    prefix: String,
    script: redis::Script,
}

/// KEYS[1] = bucket (a sorted set of tokens scored by time); ARGV = limit, window_ms, token.
/// Returns {1, 0} when allowed, {0, wait_ms} when limited.
const ACQUIRE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if n >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local wait = window
  if oldest[2] then wait = tonumber(oldest[2]) + window - now end
  return {0, wait}
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return {1, 0}
"#;

impl RedisLimiter {
    async fn acquire(&self, bucket: &str, limit: u32, window_ms: u64, token: &str) -> redis::RedisResult<Acquire> {
        let mut conn = self.conn.clone();
        let key = format!("{}{}", self.prefix, bucket);
        let (allowed, wait_ms): (i64, i64) = self
            .script
            .key(key)
            .arg(limit)
            .arg(window_ms)
            .arg(token)
            .invoke_async(&mut conn)
            .await?;
        if allowed == 1 {
            Ok(Acquire::Allowed)
        } else {
            Ok(Acquire::Limited { retry_after_seconds: (wait_ms.max(0) as u64).div_ceil(1000).max(1) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_sliding_window() {
        let l = LocalLimiter::default();
        assert_eq!(l.acquire("a", 2, 60_000, "1"), Acquire::Allowed);
        assert_eq!(l.acquire("a", 2, 60_000, "2"), Acquire::Allowed);
        assert!(matches!(l.acquire("a", 2, 60_000, "3"), Acquire::Limited { retry_after_seconds: 1..=60 }));
        assert_eq!(l.acquire("b", 2, 60_000, "1"), Acquire::Allowed);
        l.release("a", "2");
        assert_eq!(l.acquire("a", 2, 60_000, "4"), Acquire::Allowed);
    }
}
