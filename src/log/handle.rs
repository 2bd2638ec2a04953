//! `LogHandle`: the cheap, cloneable front-end of the writer thread. Each
//! call sends one command and waits for its answer, which comes only after
//! the group holding it committed; the gauges and the device counters not
//! stored yet are read here without a round trip.
//!
//! When the writer's queue is full, callers wait for room (backpressure).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::cmd::{
    AddDevice, Append, AppendRemote, Command, DeadLetter, DeviceCounts, MarkForwarded, Ping, Presence, Prune, Reply,
    Resend, RevokeDevice,
};
use super::{Counters, Error, RemoteEvent, schema};
use crate::event::Event;

/// The answer for one appended event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Appended {
    pub id: Uuid,
    pub seq: i64,
    /// The id was already in the log: nothing was written, `seq` is the original.
    pub duplicate: bool,
}

/// Cheap handle to the writer thread.
#[derive(Clone)]
pub struct LogHandle {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) full: Arc<AtomicBool>,
    pub(super) counters: Arc<Counters>,
    pub(super) unflushed: Arc<Mutex<DeviceCounts>>,
    /// Bumped before a group that stores the device counters commits (odd
    /// while it may be committing) and after `unflushed` was cleared:
    /// readers that add `unflushed` to the table's counters retry when it
    /// moved, so they never count a flush twice or not at all.
    pub(super) device_flushes: Arc<std::sync::atomic::AtomicU64>,
}

impl LogHandle {
    /// Sends one command and waits for its answer (sent after the commit).
    pub(super) async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Appends events in one all-or-nothing unit; answers after the commit.
    pub async fn append(&self, events: Vec<Event>) -> Result<Vec<Appended>, Error> {
        self.call(|reply| Command::Append(Append { events, reply })).await
    }

    /// Marks rows forwarded (after the central commit).
    pub async fn mark_forwarded(&self, seqs: Vec<i64>) -> Result<usize, Error> {
        self.call(|reply| Command::MarkForwarded(MarkForwarded { seqs, reply })).await
    }

    /// Moves a pending row the central database refused to `dead_letter`.
    pub async fn dead_letter(&self, seq: i64, error: String) -> Result<usize, Error> {
        self.call(|reply| Command::DeadLetter(DeadLetter { seq, error, reply })).await
    }

    /// Makes forwarded rows pending again because central lacks them (a
    /// failover to a standby that had not replicated them); returns how many.
    pub async fn resend(&self, seqs: Vec<i64>) -> Result<usize, Error> {
        self.call(|reply| Command::Resend(Resend { seqs, reply })).await
    }

    /// Records a device connecting or dropping (MQTT presence).
    pub async fn presence(&self, tenant: String, device_id: String, online: bool) -> Result<usize, Error> {
        self.call(|reply| Command::Presence(Presence { tenant, device_id, online, reply })).await
    }

    /// Stores events of other sites (already central, so never forwarded) and
    /// advances their catch-up cursors; duplicates by id are skipped.
    /// Returns how many were new.
    pub async fn append_remote(&self, events: Vec<RemoteEvent>) -> Result<usize, Error> {
        self.call(|reply| Command::AppendRemote(AppendRemote { events, reply })).await
    }

    /// The log's gauges (backlog, total rows, dead letters, last seq), kept
    /// by the writer: reading them costs nothing.
    pub fn counters(&self) -> schema::Scan {
        self.counters.get()
    }

    /// Adds the counters not yet stored to `devices` read from the table.
    pub fn overlay_devices(&self, devices: &mut [schema::Device], flushes: u64) -> bool {
        let unflushed = self.unflushed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = self.device_flushes.load(Ordering::SeqCst);
        if now != flushes || now % 2 == 1 {
            return false;
        }
        for d in devices {
            if let Some(&(count, last)) = unflushed.get(&(d.tenant.clone(), d.device_id.clone())) {
                d.event_count += count;
                let last = crate::event::from_us(last);
                d.last_seen = Some(d.last_seen.map_or(last, |seen| seen.max(last)));
            }
        }
        true
    }

    /// Read before the devices table: see [`overlay_devices`](Self::overlay_devices).
    pub fn device_flushes(&self) -> u64 {
        self.device_flushes.load(Ordering::SeqCst)
    }

    /// True while the log is at its byte budget (appends would be refused).
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// Deletes up to `limit` forwarded rows older than `cutoff_us`.
    pub async fn prune(&self, cutoff_us: i64, limit: usize) -> Result<usize, Error> {
        self.call(|reply| Command::Prune(Prune { cutoff_us, limit, reply })).await
    }

    /// Registers a device.
    pub async fn add_device(
        &self,
        tenant: String,
        device_id: String,
        name: Option<String>,
        role: schema::Role,
        secret: Option<(String, String)>,
    ) -> Result<schema::Device, Error> {
        self.call(|reply| Command::AddDevice(AddDevice { tenant, device_id, name, role, secret, reply })).await
    }

    /// Revokes a device.
    pub async fn revoke_device(&self, tenant: String, device_id: String) -> Result<schema::Device, Error> {
        self.call(|reply| Command::RevokeDevice(RevokeDevice { tenant, device_id, reply })).await
    }

    /// Resolves once the writer thread is gone (stopped or panicked).
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Round trip through the writer: proves it is alive and the log writable.
    pub async fn ping(&self) -> Result<(), Error> {
        self.call(|reply| Command::Ping(Ping { reply })).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a reader of the devices table sees against a flush of the
    /// counters: the writer bumps `device_flushes` before the flush commits
    /// and again once `unflushed` is cleared, and the overlay refuses (the
    /// reader reads again) when it moved or is odd.
    #[test]
    fn a_reader_never_counts_a_device_flush_twice_or_not_at_all() {
        let (tx, _rx) = mpsc::channel(1);
        let log = LogHandle {
            tx,
            full: Arc::default(),
            counters: Arc::default(),
            unflushed: Arc::default(),
            device_flushes: Arc::default(),
        };
        log.unflushed.lock().unwrap().insert(("acme".into(), "d1".into()), (3, 1_000_000));
        let table = |count| vec![schema::Device { event_count: count, ..schema::testing::device("acme", "d1", false) }];
        // No flush: the table's 2 and the 3 in memory.
        let mut d = table(2);
        assert!(log.overlay_devices(&mut d, log.device_flushes()));
        assert_eq!(d[0].event_count, 5);
        // A flush committing while the table is read (it may or may not
        // hold the 3): refused.
        let seen = log.device_flushes();
        log.device_flushes.fetch_add(1, Ordering::SeqCst);
        assert!(!log.overlay_devices(&mut table(5), seen));
        assert!(!log.overlay_devices(&mut table(5), log.device_flushes()), "odd: a flush may be committing");
        // The flush is done: the table read before it may lack the 3,
        // the memory no longer has them: refused too.
        log.unflushed.lock().unwrap().clear();
        log.device_flushes.fetch_add(1, Ordering::SeqCst);
        assert!(!log.overlay_devices(&mut table(2), seen));
        let mut d = table(5);
        assert!(log.overlay_devices(&mut d, log.device_flushes()));
        assert_eq!(d[0].event_count, 5);
    }
}
