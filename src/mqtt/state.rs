//! What the front-end keeps across connections: live sessions per device
//! (presence, take-over), persistent sessions per device (their mailbox of
//! subscriptions and deliveries, and the timer that waits for their
//! client), and a CONNECT rate per device.
//!
//! Invariants:
//! - Everything is per (tenant, device): client ids are a device's own
//!   namespace, so no device can take over, resume or end another's session.
//! - A persistent session is held by at most one waiting timer: its client's
//!   return (or the session's end) cancels it, so reconnect churn leaves no
//!   task behind; at most `mqtt.max_sessions_per_device` are held per device.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::fanout::{Fanout, Mailbox, Subscription};
use crate::config::MqttConfig;
use crate::log::mqtt::{SessionKey, StoredSession};

/// Shared by every connection of the listener.
pub(crate) struct Sessions {
    inner: Mutex<Inner>,
    /// CONNECTs per device in the current minute: (window start, count).
    connects: Mutex<HashMap<(String, String), (std::time::Instant, u32)>>,
    max_connects_per_minute: u32,
    max_persistent: usize,
    /// Persistent sessions per tenant (0: none beyond the devices' own).
    max_persistent_per_tenant: usize,
    /// Live connections per device and per tenant (0: only the global cap).
    max_per_device: usize,
    max_per_tenant: usize,
    fanout: Arc<Fanout>,
}

#[derive(Default)]
struct Inner {
    devices: HashMap<(String, String), Device>,
    /// Live connections per tenant (the devices' `live_by_client`, summed).
    live_by_tenant: HashMap<String, usize>,
    /// Tells a connection's lease from a later one with the same client id.
    generation: u64,
}

/// One device's connections and persistent sessions.
#[derive(Default)]
struct Device {
    live: usize,
    /// Persistent sessions, oldest first.
    persistent: VecDeque<Persistent>,
    /// The newest lease of each client id still connected or persistent:
    /// tells a client that came back (will delay, session expiry).
    generations: HashMap<String, u64>,
    /// Live connections by client id: (generation, take-over signal, end).
    live_by_client: HashMap<String, (u64, CancellationToken, CancellationToken)>,
}

/// A persistent session: its mailbox, and what waits for its client.
struct Persistent {
    client_id: String,
    /// The session (kept across its resumes; see `log::mqtt`).
    session_id: u64,
    mailbox: Arc<Mailbox>,
    /// Cancelled when the client returns or the session ends: stops the
    /// expiry timer and a delayed will of its last connection.
    waiting: CancellationToken,
}

/// A connection's claim on a client id, before its session is decided.
#[derive(Debug)]
pub(crate) struct Claim {
    tenant: String,
    device_id: String,
    client_id: String,
    generation: u64,
    taken_over: CancellationToken,
    ended: CancellationToken,
    /// The end of the connection this one took over, if any: the session is
    /// opened once that one has finished what it had read (and recorded its
    /// end), so the client id's publishes are stored in the order they were
    /// sent and its state is decided from what the older one left.
    pub previous: Option<CancellationToken>,
}

/// A connection's session.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    /// The session outlives the connection.
    pub persistent: bool,
    /// Cancelled when a later connection takes the client id over.
    pub taken_over: CancellationToken,
    /// Cancelled when this lease's connection has ended and its end is
    /// recorded (see [`Sessions::ended`]).
    ended: CancellationToken,
    /// The connection resumes a session the appliance holds (CONNACK
    /// session present): its held QoS 2 ids, subscriptions and deliveries.
    pub present: bool,
    /// The session's mailbox (a resumed session's own).
    pub mailbox: Arc<Mailbox>,
    /// The session: a resumed one keeps its id, a new one's is the
    /// lease's generation. Held QoS 2 ids belong to it.
    pub session_id: u64,
    /// The device's oldest persistent session (and its id), dropped to
    /// make room.
    pub evicted: Option<(SessionKey, u64)>,
    tenant: String,
    device_id: String,
    client_id: String,
    generation: u64,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox").field("id", &self.id).field("tenant", &self.tenant).finish_non_exhaustive()
    }
}

/// The site log's encoding of a session's subscriptions.
pub(crate) fn encode_subs(subs: &[Subscription]) -> String {
    let v: Vec<serde_json::Value> = subs
        .iter()
        .map(|s| {
            serde_json::json!({"f": s.filter, "q": s.qos, "nl": s.no_local, "rap": s.retain_as_published, "id": s.id})
        })
        .collect();
    serde_json::Value::Array(v).to_string()
}

fn decode_subs(encoded: &str) -> Vec<Subscription> {
    if encoded.is_empty() {
        return Vec::new();
    }
    let parsed: Result<Vec<serde_json::Value>, _> = serde_json::from_str(encoded);
    let Ok(list) = parsed else {
        tracing::warn!("a stored MQTT session's subscriptions are unreadable; resumed without them");
        return Vec::new();
    };
    list.iter()
        .filter_map(|v| {
            Some(Subscription {
                filter: v.get("f")?.as_str()?.to_string(),
                qos: v.get("q").and_then(serde_json::Value::as_u64).unwrap_or(0).min(2) as u8,
                no_local: v.get("nl").and_then(serde_json::Value::as_bool).unwrap_or(false),
                retain_as_published: v.get("rap").and_then(serde_json::Value::as_bool).unwrap_or(false),
                id: v.get("id").and_then(serde_json::Value::as_u64).map(|i| i as usize),
                layout: false,
                since: 0,
            })
        })
        .collect()
}

impl Sessions {
    /// Bounds from the `[mqtt]` config.
    pub(crate) fn new(config: &MqttConfig, fanout: Arc<Fanout>) -> Self {
        Self {
            inner: Mutex::default(),
            connects: Mutex::default(),
            max_connects_per_minute: config.max_connects_per_minute,
            max_persistent: config.max_sessions_per_device,
            max_persistent_per_tenant: config.max_sessions_per_tenant,
            max_per_device: config.max_connections_per_device,
            max_per_tenant: config.max_connections_per_tenant,
            fanout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The fan-out the sessions' mailboxes are in.
    pub(crate) fn fanout(&self) -> &Arc<Fanout> {
        &self.fanout
    }

    /// Counts a CONNECT of the device; false when it is over
    /// `mqtt.max_connects_per_minute` (fixed one-minute windows).
    pub(crate) fn connect_allowed(&self, tenant: &str, device_id: &str) -> bool {
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
    pub(crate) fn connected(&self, tenant: &str, device_id: &str) -> bool {
        let mut g = self.lock();
        let d = g.devices.entry((tenant.to_string(), device_id.to_string())).or_default();
        d.live += 1;
        d.live == 1
    }

    /// Uncounts a live connection; true when it was the device's last.
    pub(crate) fn disconnected(&self, tenant: &str, device_id: &str) -> bool {
        let mut g = self.lock();
        let key = (tenant.to_string(), device_id.to_string());
        let Some(d) = g.devices.get_mut(&key) else { return true };
        d.live = d.live.saturating_sub(1);
        let last = d.live == 0;
        if last && d.persistent.is_empty() && d.live_by_client.is_empty() && d.generations.is_empty() {
            g.devices.remove(&key);
        }
        last
    }

    /// Claims `client_id` for a new connection: the connection holding it
    /// is told it was taken over (its end is `Claim::previous`), and the
    /// connection counts against the device's and the tenant's shares.
    /// Refused (with the reason naming the share) when the device or the
    /// tenant holds its share of live connections already
    /// (`mqtt.max_connections_per_device` / `_per_tenant`); taking over a
    /// client id that is connected does not count as one more.
    pub(crate) fn claim(&self, tenant: &str, device_id: &str, client_id: &str) -> Result<Claim, String> {
        let mut g = self.lock();
        let dev_key = (tenant.to_string(), device_id.to_string());
        let device_live =
            g.devices.get(&dev_key).map(|d| (d.live_by_client.len(), d.live_by_client.contains_key(client_id)));
        if let (live, false) = device_live.unwrap_or((0, false)) {
            if self.max_per_device > 0 && live >= self.max_per_device {
                return Err(format!(
                    "device {device_id:?} holds its share of connections (mqtt.max_connections_per_device = {})",
                    self.max_per_device
                ));
            }
            let tenant_live = g.live_by_tenant.get(tenant).copied().unwrap_or(0);
            if self.max_per_tenant > 0 && tenant_live >= self.max_per_tenant {
                return Err(format!(
                    "tenant {tenant:?} holds its share of connections (mqtt.max_connections_per_tenant = {})",
                    self.max_per_tenant
                ));
            }
            *g.live_by_tenant.entry(tenant.to_string()).or_default() += 1;
        }
        g.generation += 1;
        let generation = g.generation;
        let d = g.devices.entry(dev_key).or_default();
        let (taken_over, ended) = (CancellationToken::new(), CancellationToken::new());
        let older = d.live_by_client.insert(client_id.to_string(), (generation, taken_over.clone(), ended.clone()));
        let previous = older.map(|(_, older_taken, older_ended)| {
            older_taken.cancel();
            older_ended
        });
        Ok(Claim {
            tenant: tenant.to_string(),
            device_id: device_id.to_string(),
            client_id: client_id.to_string(),
            generation,
            taken_over,
            ended,
            previous,
        })
    }

    /// The session for a claimed client id, once the connection it took
    /// over (if any) has ended. `persistent`: the session outlives the
    /// connection; `resume` = false discards a persistent session it had (a
    /// clean start), true resumes it (even a 5.0 connection whose own
    /// session expiry is 0). Refused (the claim given up, the reason naming
    /// the share) when it would be one persistent session more than the
    /// tenant's share (`mqtt.max_sessions_per_tenant`); a device at its own
    /// bound replaces its oldest instead, which is not one more.
    pub(crate) fn open(&self, claim: Claim, persistent: bool, resume: bool) -> Result<Lease, String> {
        let Claim { tenant, device_id, client_id, generation, taken_over, ended, .. } = claim;
        let mut g = self.lock();
        let max = self.max_persistent;
        if persistent && let Err(why) = self.persistent_fits(&g, &tenant, &device_id, &client_id) {
            Self::unclaim(&mut g, &tenant, &device_id, &client_id, generation);
            ended.cancel();
            return Err(why);
        }
        let d = g.devices.entry((tenant.clone(), device_id.clone())).or_default();
        d.generations.insert(client_id.clone(), generation);
        // The client id's persistent session: resumed, or (a clean start,
        // or a clean session now) ended here.
        let held = d.persistent.iter().position(|p| p.client_id == client_id).and_then(|i| d.persistent.remove(i));
        let (resumed, old) = match held {
            Some(entry) if resume => (Some(entry), None),
            other => (None, other),
        };
        let present = resumed.is_some();
        let persistent = persistent || present;
        let mut evicted = None;
        let mut session_id = generation;
        let mailbox = if let Some(mut entry) = resumed {
            entry.waiting.cancel();
            entry.waiting = CancellationToken::new();
            session_id = entry.session_id;
            let mb = entry.mailbox.clone();
            d.persistent.push_back(entry);
            mb
        } else {
            let mb = self.fanout.mailbox(&tenant);
            if persistent {
                if d.persistent.len() >= max
                    && let Some(oldest) = d.persistent.pop_front()
                {
                    oldest.waiting.cancel();
                    self.fanout.close(&oldest.mailbox);
                    evicted = Some((oldest.client_id, oldest.session_id));
                }
                d.persistent.push_back(Persistent {
                    client_id: client_id.clone(),
                    session_id,
                    mailbox: mb.clone(),
                    waiting: CancellationToken::new(),
                });
            }
            mb
        };
        if let Some(old) = old {
            old.waiting.cancel();
            self.fanout.close(&old.mailbox);
        }
        let key = |client_id: String| SessionKey { tenant: tenant.clone(), device_id: device_id.clone(), client_id };
        Ok(Lease {
            persistent,
            taken_over,
            ended,
            present,
            mailbox,
            session_id,
            evicted: evicted.map(|(client_id, session_id)| (key(client_id), session_id)),
            tenant,
            device_id,
            client_id,
            generation,
        })
    }

    /// Whether one more persistent session for `client_id` fits the
    /// tenant's share: it does when the client id holds one already, or the
    /// device is at its own bound (its oldest makes room).
    fn persistent_fits(&self, g: &Inner, tenant: &str, device_id: &str, client_id: &str) -> Result<(), String> {
        if self.max_persistent_per_tenant == 0 {
            return Ok(());
        }
        if let Some(d) = g.devices.get(&(tenant.to_string(), device_id.to_string()))
            && (d.persistent.iter().any(|p| p.client_id == client_id) || d.persistent.len() >= self.max_persistent)
        {
            return Ok(());
        }
        if Self::persistent_of(g, tenant) < self.max_persistent_per_tenant {
            return Ok(());
        }
        Err(format!(
            "tenant {tenant:?} holds its share of persistent sessions (mqtt.max_sessions_per_tenant = {})",
            self.max_persistent_per_tenant
        ))
    }

    /// Persistent sessions the tenant's devices hold (counted, not kept:
    /// a count kept beside every place a session ends could drift).
    fn persistent_of(g: &Inner, tenant: &str) -> usize {
        g.devices.iter().filter(|((t, _), _)| t == tenant).map(|(_, d)| d.persistent.len()).sum()
    }

    /// Gives up a claim that opened no session: the client id is free again
    /// and the connection no longer counts against the shares.
    fn unclaim(g: &mut Inner, tenant: &str, device_id: &str, client_id: &str, generation: u64) {
        let key = (tenant.to_string(), device_id.to_string());
        let Some(d) = g.devices.get_mut(&key) else { return };
        if d.live_by_client.get(client_id).is_some_and(|(g, _, _)| *g == generation) {
            d.live_by_client.remove(client_id);
            if let Some(n) = g.live_by_tenant.get_mut(tenant) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    g.live_by_tenant.remove(tenant);
                }
            }
        }
        if let Some(d) = g.devices.get(&key)
            && d.live == 0
            && d.persistent.is_empty()
            && d.live_by_client.is_empty()
            && d.generations.is_empty()
        {
            g.devices.remove(&key);
        }
    }

    /// `claim` and `open` at once (no connection to wait for).
    #[cfg(test)]
    fn lease(
        &self,
        tenant: &str,
        device_id: &str,
        client_id: &str,
        persistent: bool,
        resume: bool,
    ) -> Result<Lease, String> {
        self.claim(tenant, device_id, client_id).and_then(|c| self.open(c, persistent, resume))
    }

    /// A connection ended, its session with expiry `expiry`. A clean
    /// session, or one whose expiry is 0, ends with it now (its mailbox is
    /// closed), before the site log drops it, so no later connection is
    /// told it is present; a persistent one, while no newer connection has
    /// its client id, now waits for its client: the token returned is
    /// cancelled when the client returns or the session ends (`None`: not
    /// this lease's to wait for).
    pub(crate) fn release(&self, lease: &Lease, expiry: u32) -> Option<CancellationToken> {
        let mut g = self.lock();
        let key = (lease.tenant.clone(), lease.device_id.clone());
        let d = g.devices.get_mut(&key)?;
        let mut left = false;
        if d.live_by_client.get(&lease.client_id).is_some_and(|(g, _, _)| *g == lease.generation) {
            d.live_by_client.remove(&lease.client_id);
            left = true;
        }
        let newest = d.generations.get(&lease.client_id) == Some(&lease.generation);
        if newest && expiry == 0 {
            let at = d.persistent.iter().position(|p| Arc::ptr_eq(&p.mailbox, &lease.mailbox));
            if let Some(p) = at.and_then(|i| d.persistent.remove(i)) {
                p.waiting.cancel();
            }
        }
        let waiting = match d.persistent.iter().find(|p| p.client_id == lease.client_id) {
            Some(p) if newest && Arc::ptr_eq(&p.mailbox, &lease.mailbox) => Some(p.waiting.clone()),
            _ => None,
        };
        if waiting.is_none() {
            if newest {
                d.generations.remove(&lease.client_id);
            }
            if !lease.persistent || !d.persistent.iter().any(|p| Arc::ptr_eq(&p.mailbox, &lease.mailbox)) {
                self.fanout.close(&lease.mailbox);
            }
        }
        if d.live == 0 && d.persistent.is_empty() && d.live_by_client.is_empty() && d.generations.is_empty() {
            g.devices.remove(&key);
        }
        if left && let Some(n) = g.live_by_tenant.get_mut(&lease.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.live_by_tenant.remove(&lease.tenant);
            }
        }
        waiting
    }

    /// The connection of `lease` is done: released, and its end recorded
    /// in the site log. A connection that took it over goes on.
    pub(crate) fn ended(&self, lease: &Lease) {
        lease.ended.cancel();
    }

    /// True when the client id of `lease` connected again after it.
    pub(crate) fn resumed(&self, lease: &Lease) -> bool {
        let g = self.lock();
        g.devices
            .get(&(lease.tenant.clone(), lease.device_id.clone()))
            .and_then(|d| d.generations.get(&lease.client_id))
            .is_some_and(|g| *g > lease.generation)
    }

    /// The persistent session of `lease` expired: unless its client came
    /// back, it is forgotten (its mailbox closed); true when it was.
    pub(crate) fn expire(&self, lease: &Lease) -> bool {
        let mut g = self.lock();
        let key = (lease.tenant.clone(), lease.device_id.clone());
        let Some(d) = g.devices.get_mut(&key) else { return false };
        if d.generations.get(&lease.client_id) != Some(&lease.generation) {
            return false;
        }
        d.generations.remove(&lease.client_id);
        let Some(at) = d.persistent.iter().position(|p| p.client_id == lease.client_id) else { return false };
        if let Some(p) = d.persistent.remove(at) {
            p.waiting.cancel();
            self.fanout.close(&p.mailbox);
        }
        if d.live == 0 && d.persistent.is_empty() && d.live_by_client.is_empty() && d.generations.is_empty() {
            g.devices.remove(&key);
        }
        true
    }

    /// Takes in the sessions the site log held at start (oldest first): each
    /// is a persistent session waiting for its client, its subscriptions
    /// back in the fan-out. Returns a lease per session kept, with the time
    /// left until it expires and the token its client's return cancels, and
    /// the keys of sessions over the device's bound (dropped, oldest first).
    pub(crate) fn load(
        &self,
        stored: Vec<StoredSession>,
        now_us: i64,
    ) -> (Vec<(Lease, Duration, CancellationToken)>, Vec<SessionKey>) {
        let mut g = self.lock();
        let mut kept = Vec::new();
        let mut dropped = Vec::new();
        for s in stored {
            g.generation = g.generation.max(s.generation);
            let d = g.devices.entry((s.key.tenant.clone(), s.key.device_id.clone())).or_default();
            if d.persistent.iter().any(|p| p.client_id == s.key.client_id) {
                continue;
            }
            if d.persistent.len() >= self.max_persistent {
                dropped.push(s.key);
                continue;
            }
            if self.max_persistent_per_tenant > 0
                && Self::persistent_of(&g, &s.key.tenant) >= self.max_persistent_per_tenant
            {
                dropped.push(s.key);
                continue;
            }
            let d = g.devices.entry((s.key.tenant.clone(), s.key.device_id.clone())).or_default();
            let mailbox = self.fanout.mailbox(&s.key.tenant);
            self.fanout.restore(&mailbox, &s.key.device_id, decode_subs(&s.subscriptions));
            let waiting = CancellationToken::new();
            d.persistent.push_back(Persistent {
                client_id: s.key.client_id.clone(),
                session_id: s.session_id,
                mailbox: mailbox.clone(),
                waiting: waiting.clone(),
            });
            d.generations.insert(s.key.client_id.clone(), s.generation);
            let expires_at = s.ended_at_us.saturating_add(i64::from(s.expiry) * 1_000_000);
            let left = Duration::from_micros(u64::try_from(expires_at.saturating_sub(now_us)).unwrap_or(0));
            let lease = Lease {
                persistent: true,
                taken_over: CancellationToken::new(),
                ended: CancellationToken::new(),
                present: false,
                mailbox,
                session_id: s.session_id,
                evicted: None,
                tenant: s.key.tenant,
                device_id: s.key.device_id,
                client_id: s.key.client_id,
                generation: s.generation,
            };
            kept.push((lease, left, waiting));
        }
        (kept, dropped)
    }

    /// Whose session state a lease stands for, in the site log.
    pub(crate) fn key_of(lease: &Lease) -> SessionKey {
        SessionKey {
            tenant: lease.tenant.clone(),
            device_id: lease.device_id.clone(),
            client_id: lease.client_id.clone(),
        }
    }

    /// The lease's generation: the site log's session row carries it.
    pub(crate) fn generation_of(lease: &Lease) -> u64 {
        lease.generation
    }

    /// Live connections per tenant.
    pub(crate) fn connections_by_tenant(&self) -> Vec<(String, usize)> {
        self.lock().live_by_tenant.iter().map(|(t, n)| (t.clone(), *n)).collect()
    }

    #[cfg(test)]
    /// Persistent sessions held, over all devices.
    pub(crate) fn persistent_count(&self) -> usize {
        self.lock().devices.values().map(|d| d.persistent.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> Sessions {
        let config = MqttConfig {
            max_sessions_per_device: 2,
            max_sessions_per_tenant: 3,
            max_connections_per_device: 3,
            max_connections_per_tenant: 4,
            ..MqttConfig::default()
        };
        let fanout =
            Arc::new(Fanout::new(&config, Arc::default(), Arc::default(), Arc::new(crate::metrics::Metrics::new())));
        Sessions::new(&config, fanout)
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
        let a = s.lease("acme", "d1", "d1-a", true, true).unwrap();
        let b = s.lease("acme", "d1", "d1-b", true, true).unwrap();
        assert!(!a.present && a.evicted.is_none() && b.evicted.is_none());
        let again = s.lease("acme", "d1", "d1-a", true, true).unwrap();
        assert!(again.present, "resumes its own session");
        assert!(Arc::ptr_eq(&again.mailbox, &a.mailbox), "with its mailbox");
        let c = s.lease("acme", "d1", "d1-c", true, true).unwrap();
        assert_eq!(c.evicted.map(|(k, _)| k.client_id).as_deref(), Some("d1-b"), "the oldest is dropped");
        assert!(!s.lease("globex", "d1", "d1-a", true, true).unwrap().present, "tenants apart");
        assert!(!s.lease("acme", "d2", "d1-a", true, true).unwrap().present, "devices apart");
        assert_eq!(s.persistent_count(), 4);
    }

    #[test]
    fn a_return_cancels_what_waited_for_the_client_and_a_take_over_is_told() {
        let s = sessions();
        let a = s.lease("acme", "d1", "d1", true, true).unwrap();
        let waiting = s.release(&a, 60).expect("a persistent session waits for its client");
        let b = s.lease("acme", "d1", "d1", true, true).unwrap();
        assert!(waiting.is_cancelled(), "the timer of the ended connection stops at the return");
        assert!(b.present);
        assert!(!s.expire(&a), "an older lease expires nothing");
        let claim = s.claim("acme", "d1", "d1").unwrap();
        let previous = claim.previous.clone().expect("the newer one waits for the older one's end");
        assert!(b.taken_over.is_cancelled() && !previous.is_cancelled(), "the older connection is told");
        let c = s.open(claim, false, false).unwrap();
        assert!(!c.taken_over.is_cancelled());
        assert!(!c.present && !c.persistent, "a clean start ends the persistent session");
        assert!(s.release(&b, 60).is_none(), "the session it had is gone");
        s.ended(&b);
        assert!(previous.is_cancelled(), "the older one ended");
        assert!(s.release(&c, 0).is_none());
        assert_eq!(s.persistent_count(), 0);
        assert!(s.lock().devices.is_empty(), "nothing is left of the device");
    }

    #[test]
    fn an_expired_session_is_forgotten_and_a_returned_one_is_not() {
        let s = sessions();
        let a = s.lease("acme", "d1", "d1", true, true).unwrap();
        s.release(&a, 60);
        assert!(s.expire(&a));
        let b = s.lease("acme", "d1", "d1", true, true).unwrap();
        assert!(!b.present);
        // A session whose expiry is 0 at its end is gone at once, before its
        // state leaves the site log: a reconnect is never told present.
        assert!(s.release(&b, 0).is_none());
        assert!(!s.lease("acme", "d1", "d1", true, true).unwrap().present);
    }

    #[test]
    fn live_connections_are_shared_per_device_and_per_tenant() {
        let s = sessions();
        let a: Vec<Lease> = (0..3).map(|i| s.lease("acme", "d1", &format!("d1-{i}"), false, false).unwrap()).collect();
        let e = s.lease("acme", "d1", "d1-3", false, false).unwrap_err();
        assert!(e.contains("mqtt.max_connections_per_device = 3"), "{e}");
        assert!(s.lease("acme", "d1", "d1-0", false, false).is_ok(), "a take-over is not one more");
        assert!(s.lease("acme", "d2", "d2", false, false).is_ok(), "another device has its own share");
        let e = s.lease("acme", "d3", "d3", false, false).unwrap_err();
        assert!(e.contains("mqtt.max_connections_per_tenant = 4"), "{e}");
        assert!(s.lease("globex", "d3", "d3", false, false).is_ok(), "another tenant has its own");
        s.release(&a[1], 0);
        assert!(s.lease("acme", "d3", "d3", false, false).is_ok(), "a slot of the tenant came free");
    }

    #[test]
    fn persistent_sessions_are_shared_per_tenant() {
        let s = sessions();
        let _a = s.lease("acme", "d1", "d1-a", true, true).unwrap();
        let _b = s.lease("acme", "d2", "d2-a", true, true).unwrap();
        let _c = s.lease("acme", "d3", "d3-a", true, true).unwrap();
        let e = s.lease("acme", "d4", "d4-a", true, true).unwrap_err();
        assert!(e.contains("mqtt.max_sessions_per_tenant = 3"), "{e}");
        // The refused claim was given up: it holds no connection slot.
        assert_eq!(s.lock().live_by_tenant["acme"], 3);
        assert!(!s.lock().devices.contains_key(&("acme".to_string(), "d4".to_string())));
        assert!(s.lease("acme", "d4", "d4-a", false, false).is_ok(), "a clean session is not held");
        assert!(s.lease("acme", "d1", "d1-a", true, true).unwrap().present, "its own session resumes");
        assert!(s.lease("globex", "d4", "d4-a", true, true).is_ok(), "another tenant has its own");
    }

    #[test]
    fn subscriptions_survive_their_encoding() {
        let subs = vec![
            Subscription {
                filter: "acme/events/#".into(),
                qos: 2,
                no_local: true,
                retain_as_published: false,
                id: Some(7),
                layout: false,
                since: 0,
            },
            Subscription {
                filter: "acme/devices/d1/x".into(),
                qos: 0,
                no_local: false,
                retain_as_published: true,
                id: None,
                layout: false,
                since: 0,
            },
        ];
        assert_eq!(decode_subs(&encode_subs(&subs)), subs);
        assert!(decode_subs("").is_empty());
        assert!(decode_subs("not json").is_empty());
    }
}
