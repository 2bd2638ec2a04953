//! The site-wide tail for the status page: the newest events of every
//! tenant, reduced to tenant, device, type and time — never payloads, so it
//! can be shown without a device token. Fed by the hub on the writer thread;
//! it never waits (a slow page skips ahead, it never holds anything up).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::event::{Event, from_us};
use crate::log::Committed;

/// Events kept for a page that just opened.
pub(crate) const RECENT: usize = 20;

/// One line of the tail, serialized once.
#[derive(Debug)]
pub struct TailItem {
    pub seq: i64,
    /// `{"seq":…,"tenant":…,"device_id":…,"event_type":…,"received_at":…}`
    pub json: String,
}

#[derive(Serialize)]
struct TailView<'a> {
    seq: i64,
    tenant: &'a str,
    device_id: &'a str,
    event_type: &'a str,
    #[serde(with = "time::serde::rfc3339")]
    received_at: time::OffsetDateTime,
}

impl TailItem {
    fn new(seq: i64, e: &Event) -> Option<Self> {
        let json = serde_json::to_string(&TailView {
            seq,
            tenant: &e.tenant,
            device_id: &e.device_id,
            event_type: &e.event_type,
            received_at: from_us(e.received_at_us),
        })
        .ok()?;
        Some(Self { seq, json })
    }
}

/// The last [`RECENT`] events and a live feed of the following ones.
pub struct Tail {
    tx: broadcast::Sender<Arc<TailItem>>,
    recent: Mutex<VecDeque<Arc<TailItem>>>,
}

impl Default for Tail {
    fn default() -> Self {
        Self { tx: broadcast::channel(256).0, recent: Mutex::new(VecDeque::with_capacity(RECENT)) }
    }
}

impl Tail {
    /// Called after each commit, with the committed rows in seq order.
    pub fn committed(&self, events: &[Committed]) {
        // Whether anyone watches is read under the lock `subscribe` takes:
        // a watcher then either finds these items in its copy of `recent`
        // or is sent them live, never neither.
        let mut recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let live = self.tx.receiver_count() > 0;
        // Without a watcher only the last RECENT rows are worth building.
        let skip = if live { 0 } else { events.len().saturating_sub(RECENT) };
        let items = events[skip..].iter().filter_map(|c| TailItem::new(c.seq, &c.event)).map(Arc::new);
        for item in items {
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(item.clone());
            if live {
                let _ = self.tx.send(item);
            }
        }
    }

    /// Subscribes, then copies the recent events (oldest first); live items
    /// with a seq at or below the last recent one are repeats to skip.
    pub fn subscribe(&self) -> (Vec<Arc<TailItem>>, broadcast::Receiver<Arc<TailItem>>) {
        let recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let rx = self.tx.subscribe();
        (recent.iter().cloned().collect(), rx)
    }
}
