//! Rates for the status page, from counters sampled at most once a second
//! whenever the status is computed: events accepted per protocol (the
//! `events_accepted` metric) and bytes this process wrote to storage
//! (`/proc/self/io`). A small ring of samples, no scan of the log.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The protocols whose ingest rate is shown.
pub const PROTOCOLS: [&str; 3] = ["http", "ws", "mqtt"];

/// The window rates are averaged over.
const WINDOW: Duration = Duration::from_secs(60);
/// Samples closer together than this are not kept.
const STEP: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    accepted: [u64; 3],
    write_bytes: Option<u64>,
}

/// The ring of samples; the first is taken at start-up.
#[derive(Debug)]
pub struct Sampler {
    samples: VecDeque<Sample>,
}

/// Events per second by protocol over the last minute (or since start).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct IngestRates {
    pub http: f64,
    pub ws: f64,
    pub mqtt: f64,
    /// Seconds the rates are averaged over (60 once running a minute).
    pub window_seconds: f64,
}

/// What the sampler derives from the newest and a minute-old sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rates {
    pub ingest: IngestRates,
    /// Bytes written to storage per day at the current rate.
    pub write_bytes_per_day: Option<f64>,
}

impl Sampler {
    /// Starts the ring with `accepted` and `write_bytes` as of now.
    pub fn new(accepted: [u64; 3], write_bytes: Option<u64>) -> Self {
        Self::new_at(Instant::now(), accepted, write_bytes)
    }

    fn new_at(at: Instant, accepted: [u64; 3], write_bytes: Option<u64>) -> Self {
        Self { samples: VecDeque::from([Sample { at, accepted, write_bytes }]) }
    }

    /// Records the counters (at most one sample per second) and returns the
    /// rates since the newest sample at least a minute old, or the oldest.
    pub fn sample(&mut self, accepted: [u64; 3], write_bytes: Option<u64>) -> Rates {
        self.sample_at(Instant::now(), accepted, write_bytes)
    }

    fn sample_at(&mut self, at: Instant, accepted: [u64; 3], write_bytes: Option<u64>) -> Rates {
        let now = Sample { at, accepted, write_bytes };
        if self.samples.back().is_none_or(|s| at.duration_since(s.at) >= STEP) {
            self.samples.push_back(now);
        }
        // Keep one sample older than the window as the baseline.
        while self.samples.len() > 1 && self.samples.get(1).is_some_and(|s| at.duration_since(s.at) >= WINDOW) {
            self.samples.pop_front();
        }
        let Some(base) = self.samples.front().copied() else { return Rates::default() };
        let secs = at.duration_since(base.at).as_secs_f64();
        if secs < 0.5 {
            return Rates::default();
        }
        #[allow(clippy::cast_precision_loss)]
        let rate = |i: usize| accepted[i].saturating_sub(base.accepted[i]) as f64 / secs;
        #[allow(clippy::cast_precision_loss)]
        let write_bytes_per_day = match (base.write_bytes, write_bytes) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / secs * 86_400.0),
            _ => None,
        };
        Rates {
            ingest: IngestRates { http: rate(0), ws: rate(1), mqtt: rate(2), window_seconds: secs },
            write_bytes_per_day,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_average_over_the_last_minute_once_running_longer() {
        let t0 = Instant::now();
        let mut s = Sampler::new_at(t0, [0; 3], Some(0));
        // 10 HTTP events/s and 1 MQTT event/s for two minutes, sampled every second.
        let mut r = Rates::default();
        for i in 1..=120u64 {
            r = s.sample_at(t0 + Duration::from_secs(i), [10 * i, 0, i], Some(1000 * i));
        }
        assert!((r.ingest.http - 10.0).abs() < 1e-9, "{r:?}");
        assert!((r.ingest.mqtt - 1.0).abs() < 1e-9);
        assert_eq!(r.ingest.ws, 0.0);
        assert!((r.ingest.window_seconds - 60.0).abs() < 1.5);
        assert!((r.write_bytes_per_day.unwrap() - 86_400_000.0).abs() < 1.0);
        assert!(s.samples.len() <= 62, "the ring stays small: {}", s.samples.len());
    }

    #[test]
    fn a_quiet_minute_after_a_burst_reads_zero() {
        let t0 = Instant::now();
        let mut s = Sampler::new_at(t0, [0; 3], None);
        s.sample_at(t0 + Duration::from_secs(1), [500, 0, 0], None);
        let r = s.sample_at(t0 + Duration::from_secs(200), [500, 0, 0], None);
        assert_eq!(r.ingest.http, 0.0);
        assert_eq!(r.write_bytes_per_day, None);
    }
}
