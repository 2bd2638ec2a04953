//! The flash-write budget (`log.write_budget`, bytes per day): how long the
//! writer holds a group open, so that what it writes to storage stays
//! within the budget at any ingest rate the budget allows.
//!
//! A commit costs a fixed part (the pages it touches, each rewriting a
//! 4 KiB block of the WAL) and a part per event; holding the group open
//! longer spreads the fixed part over more events. The budget is a bucket
//! that fills at the budget's rate, up to one minute of it, and empties by
//! what the writer thread wrote (its WAL appends and its checkpoints,
//! `/proc/thread-self/io`). The hold follows the bucket: none while it is
//! full, `max_hold` once it is empty or in debt, in proportion between.
//!
//! Guarantees: the hold is never above `max_hold` (`log.max_commit_delay`)
//! nor below `floor` (`log.commit_delay`); the bucket starts empty and its
//! debt is never forgiven, so over any stretch the bytes written are at
//! most the budget's pace plus one minute of it, unless even `max_hold`
//! writes faster (an ingest rate the budget does not allow), which the
//! hold at `max_hold` and the status page's write rate show.

use std::time::{Duration, Instant};

/// How often the writer reads its bytes written (a read of `/proc`).
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// The bucket's size, in seconds of the budget.
const BUCKET_SECONDS: f64 = 60.0;

/// The writer's hold under a write budget.
#[derive(Debug)]
pub(crate) struct Budget {
    /// Budget bytes per second.
    rate: f64,
    /// Bytes the bucket holds when full.
    capacity: f64,
    /// Bytes left: negative is debt.
    level: f64,
    floor: Duration,
    max_hold: Duration,
    hold: Duration,
    /// The last reading: when, and the bytes written by then.
    last: Option<(Instant, u64)>,
}

impl Budget {
    /// A budget of `per_day` bytes; holds between `floor` and `max_hold`.
    /// It starts empty: at `max_hold` until the writes show room.
    pub(crate) fn new(per_day: u64, floor: Duration, max_hold: Duration) -> Self {
        #[allow(clippy::cast_precision_loss)]
        let rate = per_day as f64 / 86_400.0;
        let max_hold = max_hold.max(floor);
        Self { rate, capacity: rate * BUCKET_SECONDS, level: 0.0, floor, max_hold, hold: max_hold, last: None }
    }

    /// Whether a new reading is due at `now`.
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.last.is_none_or(|(at, _)| now.duration_since(at) >= SAMPLE_EVERY)
    }

    /// Takes a reading: `written` is the writer's bytes written so far (a
    /// counter). Moves the bucket and the hold.
    pub(crate) fn observe(&mut self, now: Instant, written: u64) {
        if let Some((at, before)) = self.last {
            let secs = now.duration_since(at).as_secs_f64();
            #[allow(clippy::cast_precision_loss)]
            let spent = written.saturating_sub(before) as f64;
            self.level = (self.level + self.rate * secs - spent).min(self.capacity);
        }
        self.last = Some((now, written));
        let empty = (1.0 - self.level / self.capacity).clamp(0.0, 1.0);
        self.hold = self.floor + (self.max_hold - self.floor).mul_f64(empty);
    }

    /// How long the next group stays open after its first request.
    pub(crate) fn hold(&self) -> Duration {
        self.hold
    }
}

/// Bytes the calling thread has written to storage (`write_bytes` of
/// `/proc/thread-self/io`); `None` where the kernel does not say.
pub(crate) fn thread_write_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/io").ok()?;
    text.lines().find_map(|l| l.strip_prefix("write_bytes: ")).and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A writer whose bytes per second fall as the hold grows: `fixed` bytes
    /// per commit (one commit per hold, or per event at a trickle) and
    /// `per_event` per event, at `events` per second.
    fn written_per_second(hold: Duration, events: f64, fixed: f64, per_event: f64) -> f64 {
        let commits = if hold.is_zero() { events } else { events.min(1.0 / hold.as_secs_f64()) };
        commits * fixed + events * per_event
    }

    #[test]
    fn it_starts_at_the_longest_hold_and_lets_go_while_writes_stay_under_the_budget() {
        let t0 = Instant::now();
        let mut b = Budget::new(86_400 * 1000, MS * 5, MS * 500);
        assert_eq!(b.hold(), MS * 500, "an empty bucket holds longest");
        b.observe(t0, 0);
        // Nothing written for two minutes: the bucket is full, the hold is the floor.
        b.observe(t0 + Duration::from_secs(120), 0);
        assert_eq!(b.hold(), MS * 5);
        // A burst of five minutes of budget: debt, held longest until repaid.
        b.observe(t0 + Duration::from_secs(121), 300 * 1000);
        assert_eq!(b.hold(), MS * 500);
        b.observe(t0 + Duration::from_secs(300), 300 * 1000);
        assert_eq!(b.hold(), MS * 500, "debt is not forgiven: 179 s repaid 179 of 240 s");
        b.observe(t0 + Duration::from_secs(600), 300 * 1000);
        assert_eq!(b.hold(), MS * 5);
    }

    #[test]
    fn at_a_trickle_it_finds_the_hold_that_keeps_the_budget() {
        // 100 events/s, 10 KB per commit and 500 B per event: 1.05 MB/s
        // without a hold, 60 KB/s at a 1 s hold; a budget of 100 KB/s.
        let budget = 100_000.0;
        let mut b = Budget::new(86_400 * 100_000, Duration::ZERO, Duration::from_secs(1));
        let t0 = Instant::now();
        let (mut written, mut t) = (0.0, t0);
        b.observe(t, 0);
        let step = Duration::from_millis(200);
        let mut late = 0.0;
        for i in 0..(3600 * 5) {
            let rate = written_per_second(b.hold(), 100.0, 10_000.0, 500.0);
            written += rate * step.as_secs_f64();
            t += step;
            b.observe(t, written as u64);
            if i == 600 * 5 {
                late = written;
            }
        }
        let hour = t.duration_since(t0).as_secs_f64();
        let pace = written / hour;
        assert!(pace <= budget * 1.01, "wrote {pace:.0} B/s against {budget} B/s");
        assert!(pace >= budget * 0.9, "left the budget unused: {pace:.0} B/s");
        let after = (written - late) / (hour - 600.0);
        assert!(after <= budget * 1.01, "after the first ten minutes: {after:.0} B/s");
        assert!(b.hold() > Duration::from_millis(50) && b.hold() < Duration::from_secs(1), "{:?}", b.hold());
    }

    #[test]
    fn a_rate_the_budget_does_not_allow_holds_at_the_longest_and_never_longer() {
        let mut b = Budget::new(1000, MS * 10, MS * 250);
        let t0 = Instant::now();
        b.observe(t0, 0);
        for s in 1..100u64 {
            b.observe(t0 + Duration::from_secs(s), s * 1_000_000);
            assert_eq!(b.hold(), MS * 250);
        }
    }

    #[test]
    fn the_thread_counter_reads_where_the_kernel_has_it() {
        if std::path::Path::new("/proc/thread-self/io").exists() {
            assert!(thread_write_bytes().is_some());
        }
    }
}
