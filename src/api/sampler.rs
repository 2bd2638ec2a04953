//! Rates for the status page, from counters sampled at most once a second
//! whenever the status is computed: events accepted per protocol (the
//! `events_accepted` metric), events written to the log, and bytes this
//! process wrote to storage (`/proc/self/io`). A small ring of samples, no
//! scan of the log.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::metrics::Protocol;

/// The protocols whose ingest rate is shown.
pub(crate) const PROTOCOLS: [&str; 3] =
    [Protocol::Http.as_str(), Protocol::WebSocket.as_str(), Protocol::Mqtt.as_str()];

/// The window rates are averaged over.
const WINDOW: Duration = Duration::from_secs(60);
/// Samples closer together than this are not kept.
const STEP: Duration = Duration::from_secs(1);

/// The counters read at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reading {
    /// `events_accepted` per protocol, in [`PROTOCOLS`] order.
    pub accepted: [u64; 3],
    /// `log_events_written`: rows written to the log, local and remote.
    pub events_written: u64,
    /// The process's `write_bytes` (None where `/proc/self/io` is absent).
    pub write_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    reading: Reading,
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
    /// Bytes written to storage per event written over the window (None
    /// when no event was written in it).
    pub write_bytes_per_event: Option<f64>,
}

impl Sampler {
    /// Starts the ring with `reading` as of now.
    pub fn new(reading: Reading) -> Self {
        Self::new_at(Instant::now(), reading)
    }

    fn new_at(at: Instant, reading: Reading) -> Self {
        Self { samples: VecDeque::from([Sample { at, reading }]) }
    }

    /// Records the counters (at most one sample per second) and returns the
    /// rates since the newest sample at least a minute old, or the oldest.
    pub fn sample(&mut self, reading: Reading) -> Rates {
        self.sample_at(Instant::now(), reading)
    }

    fn sample_at(&mut self, at: Instant, reading: Reading) -> Rates {
        let now = Sample { at, reading };
        if self.samples.back().is_none_or(|s| at.duration_since(s.at) >= STEP) {
            self.samples.push_back(now);
        }
        // Keep one sample older than the window as the baseline.
        while self.samples.len() > 1 && self.samples.get(1).is_some_and(|s| at.duration_since(s.at) >= WINDOW) {
            self.samples.pop_front();
        }
        let Some(Sample { at: base_at, reading: base }) = self.samples.front().copied() else {
            return Rates::default();
        };
        let secs = at.duration_since(base_at).as_secs_f64();
        if secs < 0.5 {
            return Rates::default();
        }
        #[allow(clippy::cast_precision_loss)]
        let rate = |i: usize| reading.accepted[i].saturating_sub(base.accepted[i]) as f64 / secs;
        let written = match (base.write_bytes, reading.write_bytes) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let events = reading.events_written.saturating_sub(base.events_written);
        #[allow(clippy::cast_precision_loss)]
        Rates {
            ingest: IngestRates { http: rate(0), ws: rate(1), mqtt: rate(2), window_seconds: secs },
            write_bytes_per_day: written.map(|w| w as f64 / secs * 86_400.0),
            write_bytes_per_event: written.filter(|_| events > 0).map(|w| w as f64 / events as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_average_over_the_last_minute_once_running_longer() {
        let t0 = Instant::now();
        let mut s = Sampler::new_at(t0, Reading { write_bytes: Some(0), ..Reading::default() });
        // 10 HTTP events/s and 1 MQTT event/s for two minutes, sampled every
        // second; 1,000 bytes written a second.
        let mut r = Rates::default();
        for i in 1..=120u64 {
            let reading = Reading { accepted: [10 * i, 0, i], events_written: 11 * i, write_bytes: Some(1000 * i) };
            r = s.sample_at(t0 + Duration::from_secs(i), reading);
        }
        assert!((r.ingest.http - 10.0).abs() < 1e-9, "{r:?}");
        assert!((r.ingest.mqtt - 1.0).abs() < 1e-9);
        assert_eq!(r.ingest.ws, 0.0);
        assert!((r.ingest.window_seconds - 60.0).abs() < 1.5);
        assert!((r.write_bytes_per_day.unwrap() - 86_400_000.0).abs() < 1.0);
        assert!((r.write_bytes_per_event.unwrap() - 1000.0 / 11.0).abs() < 1e-9, "{r:?}");
        assert!(s.samples.len() <= 62, "the ring stays small: {}", s.samples.len());
    }

    #[test]
    fn a_quiet_minute_after_a_burst_reads_zero() {
        let t0 = Instant::now();
        let mut s = Sampler::new_at(t0, Reading::default());
        let burst = Reading { accepted: [500, 0, 0], events_written: 500, write_bytes: None };
        s.sample_at(t0 + Duration::from_secs(1), burst);
        let r = s.sample_at(t0 + Duration::from_secs(200), burst);
        assert_eq!(r.ingest.http, 0.0);
        assert_eq!(r.write_bytes_per_day, None);
        assert_eq!(r.write_bytes_per_event, None);
    }
}
