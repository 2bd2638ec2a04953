//! Per-device rate limits: three windows (second, minute, hour), all enforced.
//!
//! Each window is a sliding window kept as a ring of `SLOTS` sub-window
//! counters (100 ms for the second, 6 s for the minute, 6 min for the hour):
//! a request is admitted when the events in the last `SLOTS` slots plus the
//! request stay within the limit. So "500/min" means at most 500 in any minute
//! (measured at slot granularity), not a token bucket that lets a device
//! sustain 600 in its first minute (a GCRA with burst = limit, as in
//! `governor`, allows that). The three windows are checked together and
//! charged only if all admit the request, so a refused request consumes
//! nothing, and a batch of `n` is admitted or refused whole: governor can do
//! neither, hence this small hand-written limiter.
//!
//! Time is `tokio::time::Instant`, so tests drive it with `time::pause()`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::LimitsConfig;

/// Which window refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Second,
    Minute,
    Hour,
}

impl Window {
    /// Name used in error bodies and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Second => "per_second",
            Window::Minute => "per_minute",
            Window::Hour => "per_hour",
        }
    }

    fn length(self) -> Duration {
        match self {
            Window::Second => Duration::from_secs(1),
            Window::Minute => Duration::from_secs(60),
            Window::Hour => Duration::from_secs(3600),
        }
    }
}

const WINDOWS: [Window; 3] = [Window::Second, Window::Minute, Window::Hour];

/// A refusal: the window, its limit, and when the request would be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub window: Window,
    pub limit: u32,
    pub retry_after: Duration,
}

/// Sub-windows per window.
const SLOTS: usize = 10;

/// One window: event counts of its last `SLOTS` slots.
#[derive(Clone, Copy)]
struct Counter {
    /// Start of the current (newest) slot.
    start: Instant,
    /// Ring of counts; `head` is the current slot.
    slots: [u32; SLOTS],
    head: usize,
}

impl Counter {
    fn new(now: Instant) -> Self {
        Self { start: now, slots: [0; SLOTS], head: 0 }
    }

    /// Advances the ring so the current slot contains `now`.
    fn roll(&mut self, now: Instant, slot: Duration) {
        let steps = now.saturating_duration_since(self.start).as_nanos() / slot.as_nanos();
        if steps == 0 {
            return;
        }
        for _ in 0..steps.min(SLOTS as u128) {
            self.head = (self.head + 1) % SLOTS;
            self.slots[self.head] = 0;
        }
        self.start += slot * u32::try_from(steps).unwrap_or(u32::MAX);
    }

    /// How long until `n` more fit under `limit` (`n <= limit`); zero if now.
    fn wait_for(&self, now: Instant, slot: Duration, limit: u32, n: u32) -> Duration {
        let mut total: u32 = self.slots.iter().sum();
        if total + n <= limit {
            return Duration::ZERO;
        }
        // Oldest slots leave the window one per slot boundary.
        let to_boundary = (self.start + slot).saturating_duration_since(now);
        for j in 1..=SLOTS {
            total -= self.slots[(self.head + j) % SLOTS];
            if total + n <= limit {
                return to_boundary + slot * (j as u32 - 1);
            }
        }
        to_boundary + slot * (SLOTS as u32 - 1)
    }
}

/// Checks between sweeps of idle devices.
const SWEEP_EVERY: u64 = 10_000;

/// The per-device limiter shared by every protocol.
pub struct Limiter {
    config: LimitsConfig,
    state: Mutex<State>,
}

struct State {
    devices: HashMap<String, HashMap<String, [Counter; 3]>>,
    checks: u64,
}

impl Limiter {
    /// A limiter applying `config`'s global, tenant and device limits.
    pub fn new(config: LimitsConfig) -> Self {
        Self { config, state: Mutex::new(State { devices: HashMap::new(), checks: 0 }) }
    }

    /// Admits `n` events from a device, or says which window refuses them.
    pub fn check(&self, tenant: &str, device_id: &str, n: u32) -> Result<(), Limited> {
        let mut state = self.lock();
        self.probe(&mut state, tenant, device_id, n)?;
        charge(&mut state, tenant, device_id, n);
        Ok(())
    }

    /// Admits `n` events that count for two devices (a gateway's child and
    /// the gateway), or says which window of which refuses them; neither is
    /// charged unless both admit them.
    pub fn check_pair(&self, tenant: &str, a: &str, b: &str, n: u32) -> Result<(), Limited> {
        let mut state = self.lock();
        self.probe(&mut state, tenant, a, n)?;
        self.probe(&mut state, tenant, b, n)?;
        charge(&mut state, tenant, a, n);
        charge(&mut state, tenant, b, n);
        Ok(())
    }

    /// The state, swept of idle devices every `SWEEP_EVERY` checks.
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.checks += 1;
        if state.checks.is_multiple_of(SWEEP_EVERY) {
            // Forget devices idle for over an hour: their counters are all zero.
            let now = Instant::now();
            let idle = Window::Hour.length() * 2;
            state.devices.retain(|_, t| {
                t.retain(|_, c| now.saturating_duration_since(c[2].start) < idle);
                !t.is_empty()
            });
        }
        state
    }

    /// Whether `n` more fit every window of the device now (its windows
    /// rolled to now, nothing charged).
    fn probe(&self, state: &mut State, tenant: &str, device_id: &str, n: u32) -> Result<(), Limited> {
        let rates = self.config.rates_for(tenant, device_id);
        let limits = [rates.per_second, rates.per_minute, rates.per_hour];
        let now = Instant::now();
        let counters = match state.devices.get_mut(tenant).and_then(|t| t.get_mut(device_id)) {
            Some(c) => c,
            None => state
                .devices
                .entry(tenant.to_string())
                .or_default()
                .entry(device_id.to_string())
                .or_insert([Counter::new(now); 3]),
        };
        for (i, window) in WINDOWS.iter().enumerate() {
            let (limit, length) = (limits[i], window.length());
            if n > limit {
                return Err(Limited { window: *window, limit, retry_after: length });
            }
            let slot = length / SLOTS as u32;
            counters[i].roll(now, slot);
            let wait = counters[i].wait_for(now, slot, limit, n);
            if !wait.is_zero() {
                return Err(Limited { window: *window, limit, retry_after: wait });
            }
        }
        Ok(())
    }
}

/// Charges `n` to a device [`Limiter::probe`] admitted them for.
fn charge(state: &mut State, tenant: &str, device_id: &str, n: u32) {
    if let Some(counters) = state.devices.get_mut(tenant).and_then(|t| t.get_mut(device_id)) {
        for c in counters.iter_mut() {
            c.slots[c.head] += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(s: u32, m: u32, h: u32) -> Limiter {
        Limiter::new(LimitsConfig { per_second: s, per_minute: m, per_hour: h, ..LimitsConfig::default() })
    }

    #[tokio::test(start_paused = true)]
    async fn per_second_window_refuses_the_eleventh_and_refills() {
        let l = limiter(10, 500, 10_000);
        for _ in 0..10 {
            l.check("acme", "d1", 1).unwrap();
        }
        let err = l.check("acme", "d1", 1).unwrap_err();
        assert_eq!(err.window, Window::Second);
        // The ten leave the sliding second when their 100 ms slot does.
        assert_eq!(err.retry_after, Duration::from_secs(1));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(l.check("acme", "d1", 1).is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        l.check("acme", "d1", 1).unwrap();
        // Another device has its own buckets.
        l.check("acme", "d2", 10).unwrap();
    }

    /// A gateway's child's events count for the child and the gateway:
    /// the first to refuse charges neither.
    #[tokio::test(start_paused = true)]
    async fn a_pair_is_charged_only_when_both_admit() {
        let l = limiter(10, 500, 10_000);
        for _ in 0..10 {
            l.check("acme", "gw", 1).unwrap();
        }
        assert_eq!(l.check_pair("acme", "child", "gw", 1).unwrap_err().window, Window::Second);
        // The child was not charged by the refusal: it has its full second.
        l.check("acme", "child", 10).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..10 {
            l.check_pair("acme", "child", "gw", 1).unwrap();
        }
        assert!(l.check("acme", "gw", 1).is_err(), "the gateway was charged for its child");
        assert!(l.check("acme", "child", 1).is_err(), "and the child for itself");
    }

    #[tokio::test(start_paused = true)]
    async fn per_minute_window_binds_after_sustained_traffic() {
        let l = limiter(10, 500, 10_000);
        let mut accepted = 0;
        // 10 a second for 60 s would be 600; the minute window stops it at 500 + refill.
        for _ in 0..60 {
            for _ in 0..10 {
                match l.check("acme", "d1", 1) {
                    Ok(()) => accepted += 1,
                    Err(e) => assert_eq!(e.window, Window::Minute),
                }
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(accepted, 500);
        // At 60 s the first 6 s slot (60 events) leaves the window: room again.
        l.check("acme", "d1", 10).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn per_hour_window_binds_and_names_its_wait() {
        let l = limiter(1000, 1000, 30);
        l.check("acme", "d1", 30).unwrap();
        let err = l.check("acme", "d1", 1).unwrap_err();
        assert_eq!(err.window, Window::Hour);
        assert_eq!(err.retry_after, Duration::from_secs(3600));
        tokio::time::advance(Duration::from_secs(3600)).await;
        l.check("acme", "d1", 1).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn refused_request_consumes_nothing() {
        let l = limiter(10, 15, 10_000);
        l.check("acme", "d1", 10).unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        // 10 more would break the minute window (15): refused, and the
        // second window must not have been charged for them.
        assert_eq!(l.check("acme", "d1", 10).unwrap_err().window, Window::Minute);
        l.check("acme", "d1", 5).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn no_sixty_second_span_exceeds_the_minute_limit() {
        let l = limiter(100, 500, 100_000);
        let mut admitted: Vec<Duration> = Vec::new();
        let t0 = Instant::now();
        for _ in 0..3000 {
            if l.check("acme", "d1", 1).is_ok() {
                admitted.push(t0.elapsed());
            }
            tokio::time::advance(Duration::from_millis(97)).await;
        }
        for (i, t) in admitted.iter().enumerate() {
            let in_span = admitted[i..].iter().take_while(|u| **u < *t + Duration::from_secs(60)).count();
            // Exact at slot granularity: any span of one window minus a slot.
            let _ = in_span;
            let in_54s = admitted[i..].iter().take_while(|u| **u < *t + Duration::from_secs(54)).count();
            assert!(in_54s <= 500, "{in_54s} events within 54 s from {t:?}");
            assert!(in_span <= 500 + 500 / SLOTS, "{in_span} events within 60 s from {t:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_sender_at_the_limit_is_never_refused() {
        let l = limiter(10, 600, 36_000);
        for i in 0..300 {
            // Ten at once at the start of every second, for five minutes.
            for _ in 0..10 {
                assert!(l.check("acme", "d1", 1).is_ok(), "second {i}");
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_larger_than_a_window_is_refused_outright() {
        let l = limiter(10, 500, 10_000);
        let err = l.check("acme", "d1", 11).unwrap_err();
        assert_eq!((err.window, err.limit), (Window::Second, 10));
    }
}
