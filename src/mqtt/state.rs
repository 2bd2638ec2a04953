//! What the front-end keeps across connections, so rumqttd's own state
//! (which only grows) stays bounded and presence stays right:
//! live sessions per device, persistent sessions per device, and retained
//! messages per tenant.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;
use crate::log::mqtt::{SessionKey, StoredSession};

/// Shared by every connection of the listener.
pub struct Sessions {
    inner: Mutex<Inner>,
    /// CONNECTs per device in the current minute: (window start, count).
    connects: Mutex<HashMap<(String, String), (std::time::Instant, u32)>>,
    max_connects_per_minute: u32,
    /// Persistent sessions per tenant: the router may hold subscriptions
    /// for them while they are offline (read on the writer thread).
    persistent_by_tenant: std::sync::RwLock<HashMap<String, usize>>,
    max_persistent: usize,
    max_retained: usize,
    max_retained_bytes: usize,
}

#[derive(Default)]
struct Inner {
    devices: HashMap<(String, String), Device>,
    /// Retained stream topics per tenant with their payload sizes, and the total.
    retained: HashMap<String, (HashMap<String, usize>, usize)>,
    /// Tells a connection's lease from a later one with the same client id.
    generation: u64,
}

/// One device's connections and the router client ids they use.
///
/// rumqttd keeps an entry per client id it ever saw (clean sessions leave
/// their metrics behind), so devices' client ids never reach it: each
/// connection is given a slot id, `<tenant>|<device>|p<n>` for a persistent
/// session (at most `max_sessions_per_device`, recycled oldest first) or
/// `<tenant>|<device>|c<n>` for a clean one (recycled as connections end).
/// The router's state is then bounded by slots, not by client ids ever
/// seen. A take-over of a client id still connected gets a slot of its own
/// too: the older connection may still open its router link while it ends
/// (a will, a last fan-out; see `session::link`), and under the same
/// router id that would drop the newer one's link. Take-over itself is the
/// lease's `taken_over` signal.
#[derive(Default)]
struct Device {
    live: usize,
    /// Persistent sessions, oldest first.
    persistent: VecDeque<Persistent>,
    /// Live clean sessions: lease generation → slot.
    clean: HashMap<u64, usize>,
    clean_free: Vec<usize>,
    clean_next: usize,
    /// The newest lease of each client id still connected or persistent:
    /// tells a client that came back (will delay, session expiry).
    generations: HashMap<String, u64>,
    /// Live connections by client id: (generation, take-over signal). A
    /// connection without a router link learns of its take-over here.
    live_by_client: HashMap<String, (u64, CancellationToken)>,
}

/// A persistent session: its client id, router slot and subscriptions.
#[derive(Debug, Clone, Default)]
struct Persistent {
    client_id: String,
    slot: usize,
    subs: Vec<StoredSub>,
}

/// One subscription of a session, as kept for its resume (in memory, and
/// in the site log for a resume after a restart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSub {
    #[serde(rename = "f")]
    pub filter: String,
    #[serde(rename = "q")]
    pub qos: u8,
    #[serde(rename = "nl", default, skip_serializing_if = "std::ops::Not::not")]
    pub no_local: bool,
    #[serde(rename = "rap", default, skip_serializing_if = "std::ops::Not::not")]
    pub retain_as_published: bool,
}

/// The site log's encoding of a session's subscriptions.
pub fn encode_subs(subs: &[StoredSub]) -> String {
    serde_json::to_string(subs).unwrap_or_default()
}

fn decode_subs(encoded: &str) -> Vec<StoredSub> {
    if encoded.is_empty() {
        return Vec::new();
    }
    serde_json::from_str(encoded).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "a stored MQTT session's subscriptions are unreadable; resumed without them");
        Vec::new()
    })
}

/// The router client id a connection uses, and what to do before using it.
#[derive(Debug, Clone)]
pub struct Lease {
    /// `<tenant>|<device>|p<n>` or `…|c<n>`.
    pub router_id: String,
    /// The slot held another client's persistent session: drop it first.
    pub wipe: bool,
    /// The router keeps this session after the connection (a persistent
    /// session, or one resumed: it is then expired by the front-end).
    pub persistent: bool,
    /// Cancelled when a later connection takes the client id over.
    pub taken_over: CancellationToken,
    /// The connection resumes a session the appliance holds (CONNACK
    /// session present): its held QoS 2 ids and `subs` stay.
    pub present: bool,
    /// The resumed session's subscriptions.
    pub subs: Vec<StoredSub>,
    /// The device's oldest persistent session, dropped to make room.
    pub evicted: Option<SessionKey>,
    tenant: String,
    device_id: String,
    client_id: String,
    generation: u64,
}

impl Sessions {
    /// Bounds from the `[mqtt]` config.
    pub fn new(config: &MqttConfig) -> Self {
        Self {
            inner: Mutex::default(),
            persistent_by_tenant: Default::default(),
            connects: Mutex::default(),
            max_connects_per_minute: config.max_connects_per_minute,
            max_persistent: config.max_sessions_per_device,
            max_retained: config.max_retained_per_tenant,
            max_retained_bytes: config.max_retained_bytes_per_tenant,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a CONNECT of the device; false when it is over
    /// `mqtt.max_connects_per_minute` (fixed one-minute windows).
    pub fn connect_allowed(&self, tenant: &str, device_id: &str) -> bool {
        if self.max_connects_per_minute == 0 {
            return true;
        }
        let now = std::time::Instant::now();
        let minute = std::time::Duration::from_secs(60);
        let mut m = self.connects.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() > 4096 {
            m.retain(|_, (start, _)| now.duration_since(*start) < minute);
        }
        let (start, n) = m.entry((tenant.to_string(), device_id.to_string())).or_insert((now, 0));
        if now.duration_since(*start) >= minute {
            (*start, *n) = (now, 0);
        }
        *n += 1;
        *n <= self.max_connects_per_minute
    }

    /// Counts a live connection; true when it is the device's first.
    pub fn connected(&self, tenant: &str, device_id: &str) -> bool {
        let mut g = self.lock();
        let d = g.devices.entry((tenant.to_string(), device_id.to_string())).or_default();
        d.live += 1;
        d.live == 1
    }

    /// Uncounts a live connection; true when it was the device's last.
    pub fn disconnected(&self, tenant: &str, device_id: &str) -> bool {
        let mut g = self.lock();
        let key = (tenant.to_string(), device_id.to_string());
        let Some(d) = g.devices.get_mut(&key) else { return true };
        d.live = d.live.saturating_sub(1);
        let last = d.live == 0;
        if last && d.persistent.is_empty() && d.clean.is_empty() && d.live_by_client.is_empty() {
            g.devices.remove(&key);
        }
        last
    }

    /// The router client id for a connection of `client_id`. `persistent`:
    /// the session outlives the connection; `resume` = false discards a
    /// persistent session it had (a clean start), true resumes it (even a
    /// 5.0 connection whose own session expiry is 0).
    pub fn lease(&self, tenant: &str, device_id: &str, client_id: &str, persistent: bool, resume: bool) -> Lease {
        let mut g = self.lock();
        g.generation += 1;
        let generation = g.generation;
        let max = self.max_persistent;
        let d = g.devices.entry((tenant.to_string(), device_id.to_string())).or_default();
        d.generations.insert(client_id.to_string(), generation);
        let taken_over = CancellationToken::new();
        if let Some((_, older)) = d.live_by_client.insert(client_id.to_string(), (generation, taken_over.clone())) {
            older.cancel();
        }
        let known = d.persistent.iter().position(|p| p.client_id == client_id);
        let present = resume && known.is_some();
        let persistent = persistent || present;
        let mut subs = Vec::new();
        let mut evicted = None;
        let (slot, wipe) = if persistent {
            match known {
                // Resumes its own session, or starts it afresh in the same slot.
                Some(i) => {
                    let mut entry = d.persistent.remove(i).unwrap_or_default();
                    if resume {
                        subs = entry.subs.clone();
                    } else {
                        entry.subs.clear();
                    }
                    let slot = entry.slot;
                    d.persistent.push_back(entry);
                    (format!("p{slot}"), !resume)
                }
                None => {
                    let used: Vec<usize> = d.persistent.iter().map(|p| p.slot).collect();
                    let slot = match (0..max).find(|s| !used.contains(s)) {
                        Some(s) => {
                            self.count_persistent(tenant, true);
                            s
                        }
                        // Full: the oldest session is dropped, its slot reused.
                        None => d.persistent.pop_front().map_or(0, |p| {
                            evicted = Some(p.client_id);
                            p.slot
                        }),
                    };
                    d.persistent.push_back(Persistent { client_id: client_id.to_string(), slot, subs: Vec::new() });
                    (format!("p{slot}"), true)
                }
            }
        } else {
            // A clean session discards a persistent one of that client id.
            if let Some(i) = known {
                d.persistent.remove(i);
                self.count_persistent(tenant, false);
            }
            let slot = d.clean_free.pop().unwrap_or_else(|| {
                d.clean_next += 1;
                d.clean_next - 1
            });
            d.clean.insert(generation, slot);
            (format!("c{slot}"), false)
        };
        let key =
            |client_id: String| SessionKey { tenant: tenant.to_string(), device_id: device_id.to_string(), client_id };
        Lease {
            router_id: format!("{tenant}|{device_id}|{slot}"),
            wipe,
            persistent,
            present,
            subs,
            evicted: evicted.map(key),
            tenant: tenant.to_string(),
            device_id: device_id.to_string(),
            client_id: client_id.to_string(),
            generation,
            taken_over,
        }
    }

    /// Takes in the sessions the site log held at start (oldest first): each
    /// is a persistent session waiting for its client. Returns a lease per
    /// session kept, with the time left until it expires, and the keys of
    /// sessions over the device's bound (dropped, oldest first).
    pub fn load(&self, stored: Vec<StoredSession>, now_us: i64) -> (Vec<(Lease, Duration)>, Vec<SessionKey>) {
        let mut g = self.lock();
        let mut kept = Vec::new();
        let mut dropped = Vec::new();
        for s in stored {
            g.generation = g.generation.max(s.generation);
            let d = g.devices.entry((s.key.tenant.clone(), s.key.device_id.clone())).or_default();
            if d.persistent.iter().any(|p| p.client_id == s.key.client_id) {
                continue;
            }
            let used: Vec<usize> = d.persistent.iter().map(|p| p.slot).collect();
            let Some(slot) = (0..self.max_persistent).find(|s| !used.contains(s)) else {
                dropped.push(s.key);
                continue;
            };
            d.persistent.push_back(Persistent {
                client_id: s.key.client_id.clone(),
                slot,
                subs: decode_subs(&s.subscriptions),
            });
            d.generations.insert(s.key.client_id.clone(), s.generation);
            self.count_persistent(&s.key.tenant, true);
            let expires_at = s.ended_at_us.saturating_add(i64::from(s.expiry) * 1_000_000);
            let left = Duration::from_micros(u64::try_from(expires_at.saturating_sub(now_us)).unwrap_or(0));
            kept.push((
                Lease {
                    router_id: format!("{}|{}|p{slot}", s.key.tenant, s.key.device_id),
                    wipe: false,
                    persistent: true,
                    present: false,
                    subs: Vec::new(),
                    evicted: None,
                    tenant: s.key.tenant,
                    device_id: s.key.device_id,
                    client_id: s.key.client_id,
                    generation: s.generation,
                    taken_over: CancellationToken::new(),
                },
                left,
            ));
        }
        (kept, dropped)
    }

    /// A persistent session's subscriptions changed (kept for its resume);
    /// false when the lease no longer owns the session.
    pub fn set_subs(&self, lease: &Lease, subs: Vec<StoredSub>) -> bool {
        let mut g = self.lock();
        let Some(d) = g.devices.get_mut(&(lease.tenant.clone(), lease.device_id.clone())) else { return false };
        if d.generations.get(&lease.client_id) != Some(&lease.generation) {
            return false;
        }
        match d.persistent.iter_mut().find(|p| p.client_id == lease.client_id) {
            Some(p) => {
                p.subs = subs;
                true
            }
            None => false,
        }
    }

    /// A connection ended: a clean session's slot is free again.
    pub fn release(&self, lease: &Lease) {
        let mut g = self.lock();
        let Some(d) = g.devices.get_mut(&(lease.tenant.clone(), lease.device_id.clone())) else { return };
        if let Some(slot) = d.clean.remove(&lease.generation) {
            d.clean_free.push(slot);
        }
        if d.live_by_client.get(&lease.client_id).is_some_and(|(g, _)| *g == lease.generation) {
            d.live_by_client.remove(&lease.client_id);
        }
        let persistent = d.persistent.iter().any(|p| p.client_id == lease.client_id);
        if !persistent && d.generations.get(&lease.client_id) == Some(&lease.generation) {
            d.generations.remove(&lease.client_id);
        }
    }

    /// True when the client id of `lease` connected again after it.
    pub fn resumed(&self, lease: &Lease) -> bool {
        let g = self.lock();
        g.devices
            .get(&(lease.tenant.clone(), lease.device_id.clone()))
            .and_then(|d| d.generations.get(&lease.client_id))
            .is_some_and(|g| *g > lease.generation)
    }

    /// The persistent session of `lease` expired: unless its client came
    /// back, it is forgotten; returns the router id whose session to drop.
    pub fn expire(&self, lease: &Lease) -> Option<String> {
        let mut g = self.lock();
        let d = g.devices.get_mut(&(lease.tenant.clone(), lease.device_id.clone()))?;
        if d.generations.get(&lease.client_id) != Some(&lease.generation) {
            return None;
        }
        d.generations.remove(&lease.client_id);
        let at = d.persistent.iter().position(|p| p.client_id == lease.client_id)?;
        d.persistent.remove(at);
        self.count_persistent(&lease.tenant, false);
        Some(lease.router_id.clone())
    }

    fn count_persistent(&self, tenant: &str, added: bool) {
        let mut m = self.persistent_by_tenant.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(tenant.to_string()).or_insert(0);
        *n = if added { *n + 1 } else { n.saturating_sub(1) };
        if *n == 0 {
            m.remove(tenant);
        }
    }

    /// True while `tenant` has persistent sessions (online or not).
    pub fn has_persistent(&self, tenant: &str) -> bool {
        let m = self.persistent_by_tenant.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.contains_key(tenant)
    }

    /// Whose session state a lease stands for, in the site log.
    pub fn key_of(lease: &Lease) -> SessionKey {
        SessionKey {
            tenant: lease.tenant.clone(),
            device_id: lease.device_id.clone(),
            client_id: lease.client_id.clone(),
        }
    }

    /// The lease's generation: the site log's session row carries it.
    pub fn generation_of(lease: &Lease) -> u64 {
        lease.generation
    }

    /// A retained publish of `bytes` on `topic` (0 clears it). False when the
    /// tenant's bounds leave no room: then it is delivered but not retained.
    pub fn retain(&self, tenant: &str, topic: &str, bytes: usize) -> bool {
        let mut g = self.lock();
        let (topics, total) = g.retained.entry(tenant.to_string()).or_default();
        let old = topics.get(topic).copied();
        if bytes == 0 {
            if let Some(old) = topics.remove(topic) {
                *total -= old;
            }
            return true;
        }
        let count = topics.len() + usize::from(old.is_none());
        let new_total = *total - old.unwrap_or(0) + bytes;
        if count > self.max_retained || new_total > self.max_retained_bytes {
            return false;
        }
        topics.insert(topic.to_string(), bytes);
        *total = new_total;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> Sessions {
        Sessions::new(&MqttConfig {
            max_sessions_per_device: 2,
            max_retained_per_tenant: 2,
            max_retained_bytes_per_tenant: 10,
            ..MqttConfig::default()
        })
    }

    #[test]
    fn presence_stays_online_until_the_last_session_ends() {
        let s = sessions();
        assert!(s.connected("acme", "d1"));
        assert!(!s.connected("acme", "d1"));
        assert!(s.connected("globex", "d1"), "tenants are counted apart");
        assert!(!s.disconnected("acme", "d1"));
        assert!(s.disconnected("acme", "d1"));
    }

    #[test]
    fn persistent_sessions_per_device_are_bounded_oldest_first() {
        let s = sessions();
        let a = s.lease("acme", "d1", "d1-a", true, true);
        let b = s.lease("acme", "d1", "d1-b", true, true);
        assert_eq!((a.router_id.as_str(), a.wipe), ("acme|d1|p0", true));
        assert_eq!(b.router_id, "acme|d1|p1");
        let again = s.lease("acme", "d1", "d1-a", true, true);
        assert_eq!((again.router_id.as_str(), again.wipe), ("acme|d1|p0", false), "resumes its own session");
        let c = s.lease("acme", "d1", "d1-c", true, true);
        assert_eq!((c.router_id.as_str(), c.wipe), ("acme|d1|p1", true), "the oldest (d1-b) is dropped");
        assert_eq!(s.lease("globex", "d1", "d1-a", true, true).router_id, "globex|d1|p0", "tenants apart");
    }

    #[test]
    fn clean_sessions_recycle_slots_and_keep_take_over() {
        let s = sessions();
        let a = s.lease("acme", "d1", "d1", false, false);
        let b = s.lease("acme", "d1", "d1-x", false, false);
        assert_eq!((a.router_id.as_str(), b.router_id.as_str()), ("acme|d1|c0", "acme|d1|c1"));
        let a2 = s.lease("acme", "d1", "d1", false, false);
        // A take-over: the older connection is told, and the newer one has a
        // router id of its own (a link the older one opens while it ends
        // must not drop the newer one's).
        assert_eq!(a2.router_id, "acme|d1|c2");
        assert!(a.taken_over.is_cancelled() && !a2.taken_over.is_cancelled(), "the older connection is told");
        assert!(!b.taken_over.is_cancelled());
        s.release(&a); // the old connection ends after the take-over: its slot is free again
        assert_eq!(s.lease("acme", "d1", "d1-y", false, false).router_id, "acme|d1|c0");
        s.release(&a2);
        s.release(&b);
        // Thousands of distinct client ids, one at a time: two slots in all.
        for i in 0..1000 {
            let l = s.lease("acme", "d1", &format!("d1-{i}"), false, false);
            assert!(l.router_id == "acme|d1|c0" || l.router_id == "acme|d1|c1", "{}", l.router_id);
            s.release(&l);
        }
    }

    #[test]
    fn retained_messages_are_bounded_by_count_and_bytes() {
        let s = sessions();
        assert!(s.retain("acme", "a", 4));
        assert!(s.retain("acme", "b", 4));
        assert!(!s.retain("acme", "c", 1), "count");
        assert!(!s.retain("acme", "a", 7), "bytes");
        assert!(s.retain("acme", "a", 6), "replacing counts the difference");
        assert!(s.retain("acme", "b", 0), "an empty retained publish clears");
        assert!(s.retain("acme", "c", 1));
        assert!(s.retain("globex", "a", 10), "tenants are bounded apart");
    }
}
