//! Counters of the data plane, shared by all shards (relaxed atomics: each is a statistic, not
//! a synchronization point), and the connect-rate limiter.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

/// Why connections ended or were refused, and what flowed through them.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections_accepted: AtomicU64,
    pub connections_open: AtomicU64,
    pub connects_ok: AtomicU64,
    /// CONNACK 5: bad token, unknown or disabled identity, wrong method.
    pub connects_not_authorized: AtomicU64,
    /// CONNACK 3: over the connection or connect-rate limit.
    pub connects_throttled: AtomicU64,
    /// CONNACK 1 or 2, or a first packet that is not a valid CONNECT.
    pub connects_malformed: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub handoffs: AtomicU64,
    pub messages_in: AtomicU64,
    pub message_bytes_in: AtomicU64,
    /// Connections closed for a protocol violation (malformed packet, QoS 2, foreign topic,
    /// oversize message).
    pub protocol_violations: AtomicU64,
    pub keepalive_timeouts: AtomicU64,
    /// Connections replaced by a newer connection of the same identity.
    pub replaced: AtomicU64,
    /// Connections closed because the registry disabled, deleted or re-keyed the identity.
    pub revoked: AtomicU64,
    pub append_errors: AtomicU64,
    pub accept_errors: AtomicU64,
    pub inbox_full: AtomicU64,
    /// Twin requests answered 429 at once because the control plane's event queue was full.
    pub twin_requests_throttled: AtomicU64,
    /// Messages for a connection dropped because its outbound queue was full or it had gone.
    pub outbound_dropped: AtomicU64,
    /// Connections that routed their first messages without their twin (it did not arrive in
    /// time): `$twin` was undefined for those.
    pub twin_waits_timed_out: AtomicU64,
    /// Method answers with an unknown or late `$rid`, dropped.
    pub method_responses_unmatched: AtomicU64,
    pub c2d_delivered: AtomicU64,
    pub c2d_completed: AtomicU64,
}

/// A token bucket: `rate` connects per second, bursts up to one second's worth.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(rate_per_sec: u32) -> Self {
        let rate = f64::from(rate_per_sec);
        Self {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn now_secs() -> u64 {
    now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_limiter_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(10);
        let granted = (0..20).filter(|_| limiter.try_take(start)).count();
        assert_eq!(granted, 10);
        assert!(limiter.try_take(start + Duration::from_millis(150)));
        assert!(!limiter.try_take(start + Duration::from_millis(151)));
    }
}
