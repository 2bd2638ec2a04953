//! The stream hub: one fan-out per tenant, fed by the site-log writer right
//! after each commit (local events at once, even with the uplink down, and
//! remote events once the central LISTEN connection stored them).
//!
//! Guarantees:
//! - Publishing never waits: each subscriber has a bounded queue (a
//!   `broadcast` ring); one that falls behind is told its last delivered seq
//!   and closed, and resumes from that cursor.
//! - The site-log `seq` is the one cursor. A subscriber subscribes first, then
//!   replays the log after its cursor, then goes live skipping seq ≤ the last
//!   one replayed: no gap and no duplicate at the seam.
//! - Tenants never share a channel.

pub(crate) mod http;
pub(crate) mod interest;
pub(crate) mod listen;
mod open;
pub(crate) mod tail;
pub(crate) mod ws;

pub(crate) use open::StreamState;

/// Bytes of a WebSocket `event` frame around its payload, allowed on top of
/// `limits.max_payload_bytes` (device id, event type, id, timestamp, keys).
pub(crate) const WS_ENVELOPE: usize = 4096;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::broadcast;

use crate::event::{Event, StoredEvent, from_us};
use crate::log::{CommitObserver, Committed, Readers, schema};
use crate::metrics::Metrics;

/// What subscribers receive.
#[derive(Debug, Clone)]
pub enum Item {
    Event(Arc<EventItem>),
    Presence { device_id: String, online: bool },
}

/// A committed event, serialized once for every subscriber.
#[derive(Debug)]
pub struct EventItem {
    pub seq: i64,
    pub device_id: String,
    pub event_type: String,
    pub received_at_us: i64,
    /// `{"id":…,"device_id":…,…}`: the `event` of a stream frame.
    pub json: String,
}

/// The JSON shape of an event in stream frames.
#[derive(Serialize)]
struct EventView<'a> {
    id: uuid::Uuid,
    device_id: &'a str,
    event_type: &'a str,
    payload: &'a RawValue,
    #[serde(with = "time::serde::rfc3339")]
    timestamp: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    received_at: time::OffsetDateTime,
    origin_site: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<&'a RawValue>,
}

impl EventItem {
    /// From a committed `Event` (writer path).
    pub fn from_event(seq: i64, e: &Event) -> Option<Self> {
        let payload = RawValue::from_string(e.payload.clone()).ok()?;
        let properties = e.properties.clone().map(RawValue::from_string).transpose().ok()?;
        let json = serde_json::to_string(&EventView {
            id: e.id,
            device_id: &e.device_id,
            event_type: &e.event_type,
            payload: &payload,
            timestamp: from_us(e.timestamp_us),
            received_at: from_us(e.received_at_us),
            origin_site: &e.origin_site,
            properties: properties.as_deref(),
        })
        .ok()?;
        Some(Self {
            seq,
            device_id: e.device_id.clone(),
            event_type: e.event_type.clone(),
            received_at_us: e.received_at_us,
            json,
        })
    }

    /// From a row of the log (replay path): the same shape.
    pub fn from_stored(e: &StoredEvent) -> Option<Self> {
        let json = serde_json::to_string(&EventView {
            id: e.id,
            device_id: &e.device_id,
            event_type: &e.event_type,
            payload: &e.payload,
            timestamp: e.timestamp,
            received_at: e.received_at,
            origin_site: &e.origin_site,
            properties: e.properties.as_deref(),
        })
        .ok()?;
        let received_at_us = crate::event::to_us(e.received_at);
        Some(Self {
            seq: e.seq,
            device_id: e.device_id.clone(),
            event_type: e.event_type.clone(),
            received_at_us,
            json,
        })
    }

    /// `{"type":"event","seq":…,"event":{…}}`
    pub fn frame(&self) -> String {
        format!(r#"{{"type":"event","seq":{},"event":{}}}"#, self.seq, self.json)
    }
}

/// Subscriber filters: a device id, and event types with `*` standing for
/// one dot-separated segment (`alarm.*` matches `alarm.high`, not `alarm`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Filter {
    pub device_id: Option<String>,
    pub event_types: Vec<String>,
}

/// `pattern` with `*` segments against a dot-separated `value`.
pub(crate) fn type_matches(pattern: &str, value: &str) -> bool {
    let (mut p, mut v) = (pattern.split('.'), value.split('.'));
    loop {
        match (p.next(), v.next()) {
            (None, None) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// Longest `event_types` query parameter: 64 patterns and their commas.
pub(crate) const MAX_EVENT_TYPES_PARAM: usize = 6400;

impl Filter {
    /// The `device_id` and `event_types` query parameters of the stream
    /// routes, exactly as the OpenAPI document declares them: `device_id` a
    /// device id (`^[A-Za-z0-9_.:-]{1,255}$`); `event_types` empty, or up
    /// to 64 comma-separated patterns without spaces, each dot-separated
    /// segments of `[A-Za-z0-9_-]+` or `*`, at most
    /// [`MAX_EVENT_TYPES_PARAM`] characters in all. `Err((field, why))`.
    pub(crate) fn from_query(
        device_id: Option<&str>,
        event_types: Option<&str>,
    ) -> Result<Self, (&'static str, String)> {
        if let Some(d) = device_id {
            crate::event::validate_device_id(d).map_err(|e| ("device_id", e.message))?;
        }
        if let Some(t) = event_types.filter(|t| !t.is_empty()) {
            if t.len() > MAX_EVENT_TYPES_PARAM {
                return Err(("event_types", format!("at most {MAX_EVENT_TYPES_PARAM} characters")));
            }
            let items: Vec<&str> = t.split(',').collect();
            if items.len() > 64 {
                return Err(("event_types", "at most 64 patterns".into()));
            }
            for p in items {
                let segment_ok = |seg: &str| {
                    seg == "*"
                        || (!seg.is_empty() && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
                };
                if !p.split('.').all(segment_ok) {
                    return Err((
                        "event_types",
                        format!(
                            "pattern {p:?}: dot-separated segments of [A-Za-z0-9_-] or a whole `*` \
                             (e.g. alarm.*), comma-separated without spaces"
                        ),
                    ));
                }
            }
        }
        Self::parse(device_id, event_types).map_err(|m| ("event_types", m))
    }

    /// Parses `device_id` and a comma-separated `event_types` list (as a
    /// WebSocket `subscribe` frame gives them: spaces around items allowed).
    pub(crate) fn parse(device_id: Option<&str>, event_types: Option<&str>) -> Result<Self, String> {
        let mut types = Vec::new();
        for t in event_types.unwrap_or("").split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let plain = t.replace('*', "x");
            if plain.len() <= crate::event::MAX_EVENT_TYPE {
                crate::event::validate_event_type(&plain).map_err(|e| format!("event_types {t:?}: {}", e.message))?;
            }
            if t.split('.').any(|seg| seg.contains('*') && seg != "*") {
                return Err(format!("event_types {t:?}: `*` must be a whole segment, e.g. alarm.*"));
            }
            types.push(t.to_string());
        }
        if types.len() > 64 {
            return Err("event_types: at most 64 patterns".into());
        }
        Ok(Self { device_id: device_id.filter(|d| !d.is_empty()).map(str::to_string), event_types: types })
    }

    pub(crate) fn matches_event(&self, device_id: &str, event_type: &str) -> bool {
        self.device_id.as_deref().is_none_or(|d| d == device_id)
            && (self.event_types.is_empty() || self.event_types.iter().any(|p| type_matches(p, event_type)))
    }

    pub(crate) fn matches(&self, item: &Item) -> bool {
        match item {
            Item::Event(e) => self.matches_event(&e.device_id, &e.event_type),
            Item::Presence { device_id, .. } => self.device_id.as_deref().is_none_or(|d| d == device_id),
        }
    }
}

/// Per-tenant fan-out.
pub struct Hub {
    capacity: usize,
    tenants: RwLock<HashMap<String, broadcast::Sender<Item>>>,
    subscribers: AtomicUsize,
    max_subscribers: usize,
    shares: Shares,
    /// Open subscribers per device and per tenant, and the status page's.
    held: std::sync::Mutex<Held>,
    pub metrics: Arc<Metrics>,
    /// Site-wide, payload-free tail for the status page.
    pub tail: tail::Tail,
    /// Tenants with a local subscriber (the central listener reads these).
    pub interest: Arc<interest::Interest>,
}

/// Why a subscription ended early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Closed {
    /// The subscriber fell more than its queue behind.
    Lagged { last_seq: i64 },
    /// The hub is gone (shutdown).
    Gone,
}

/// Counts one open subscriber; released on drop.
pub struct Slot {
    hub: Arc<Hub>,
    kind: &'static str,
    owner: Owner,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.hub.subscribers.fetch_sub(1, Ordering::Relaxed);
        self.hub.metrics.stream_subscribers.get_or_create(&crate::metrics::KindLabel { kind: self.kind }).dec();
        self.hub.held().release(&self.owner);
    }
}

/// Who holds a subscriber slot: a device of a tenant, an admin token of a
/// tenant, or the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Device { tenant: String, device_id: String },
    Admin { tenant: String },
    StatusPage,
}

impl Owner {
    /// Who a principal subscribing to `tenant` is.
    pub fn of(principal: &crate::auth::Principal, tenant: &str) -> Self {
        match principal {
            crate::auth::Principal::Device { device_id, .. } => {
                Owner::Device { tenant: tenant.to_string(), device_id: device_id.clone() }
            }
            crate::auth::Principal::Admin => Owner::Admin { tenant: tenant.to_string() },
        }
    }

    fn tenant(&self) -> Option<&str> {
        match self {
            Owner::Device { tenant, .. } | Owner::Admin { tenant } => Some(tenant),
            Owner::StatusPage => None,
        }
    }
}

/// The shares of `stream.max_subscribers` (0: none beyond it).
#[derive(Debug, Clone, Copy, Default)]
pub struct Shares {
    pub per_device: usize,
    pub per_tenant: usize,
    /// The status page's feeds: a pool of their own.
    pub status_page: usize,
}

#[derive(Default)]
struct Held {
    devices: HashMap<(String, String), usize>,
    tenants: HashMap<String, usize>,
    status_page: usize,
}

impl Held {
    fn release(&mut self, owner: &Owner) {
        fn dec<K: std::hash::Hash + Eq>(m: &mut HashMap<K, usize>, k: &K) {
            if let Some(n) = m.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    m.remove(k);
                }
            }
        }
        match owner {
            Owner::Device { tenant, device_id } => dec(&mut self.devices, &(tenant.clone(), device_id.clone())),
            Owner::Admin { .. } => {}
            Owner::StatusPage => self.status_page = self.status_page.saturating_sub(1),
        }
        if let Some(t) = owner.tenant() {
            dec(&mut self.tenants, &t.to_string());
        }
    }
}

/// Why no slot: the share (config key) that is full, and its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Full {
    pub share: &'static str,
    pub limit: usize,
    /// A share of one device or tenant (429), or the whole pool (503).
    pub own: bool,
}

impl Full {
    /// The HTTP refusal: the share and its limit, in the message and `field`.
    pub fn api_error(&self) -> crate::http::ApiError {
        use axum::http::StatusCode;
        let message = format!("{} = {} subscribers reached; retry later", self.share, self.limit);
        let status = if self.own { StatusCode::TOO_MANY_REQUESTS } else { StatusCode::SERVICE_UNAVAILABLE };
        let mut e = crate::http::ApiError::new(status, "too_many_subscribers", message).with_field(self.share);
        e.retry_after = Some(std::time::Duration::from_secs(5));
        e
    }
}

impl Hub {
    /// A hub whose subscribers each hold up to `capacity` undelivered items.
    pub fn new(capacity: usize, max_subscribers: usize, shares: Shares, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            tenants: RwLock::new(HashMap::new()),
            subscribers: AtomicUsize::new(0),
            max_subscribers,
            shares,
            held: std::sync::Mutex::default(),
            metrics,
            tail: tail::Tail::default(),
            interest: Default::default(),
        })
    }

    fn sender(&self, tenant: &str) -> broadcast::Sender<Item> {
        if let Some(tx) = self.tenants.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(tenant) {
            return tx.clone();
        }
        let mut map = self.tenants.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(tenant.to_string()).or_insert_with(|| broadcast::channel(self.capacity).0).clone()
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a subscriber slot for `owner`: refused over the device's or
    /// the tenant's share (`stream.max_subscribers_per_device` /
    /// `_per_tenant`), over the status page's pool
    /// (`stream.max_status_subscribers`), or beyond `stream.max_subscribers`
    /// (the status page's feeds are not counted there: no device can take
    /// the installer's page away).
    pub fn slot(self: &Arc<Self>, kind: &'static str, owner: Owner) -> Result<Slot, Full> {
        let mut held = self.held();
        let share = |share, limit, n: usize| (limit > 0 && n >= limit).then_some(Full { share, limit, own: true });
        let refused = match &owner {
            Owner::Device { tenant, device_id } => {
                let n = held.devices.get(&(tenant.clone(), device_id.clone())).copied().unwrap_or(0);
                share("stream.max_subscribers_per_device", self.shares.per_device, n)
            }
            Owner::Admin { .. } => None,
            Owner::StatusPage => share("stream.max_status_subscribers", self.shares.status_page, held.status_page),
        }
        .or_else(|| {
            let n = owner.tenant().and_then(|t| held.tenants.get(t)).copied().unwrap_or(0);
            owner.tenant().and_then(|_| share("stream.max_subscribers_per_tenant", self.shares.per_tenant, n))
        });
        if let Some(full) = refused {
            return Err(full);
        }
        if owner != Owner::StatusPage {
            let n = self.subscribers.fetch_add(1, Ordering::Relaxed);
            if n >= self.max_subscribers {
                self.subscribers.fetch_sub(1, Ordering::Relaxed);
                return Err(Full { share: "stream.max_subscribers", limit: self.max_subscribers, own: false });
            }
        } else {
            self.subscribers.fetch_add(1, Ordering::Relaxed); // released like any slot
        }
        match &owner {
            Owner::Device { tenant, device_id } => {
                *held.devices.entry((tenant.clone(), device_id.clone())).or_default() += 1;
            }
            Owner::Admin { .. } => {}
            Owner::StatusPage => held.status_page += 1,
        }
        if let Some(t) = owner.tenant() {
            *held.tenants.entry(t.to_string()).or_default() += 1;
        }
        drop(held);
        self.metrics.stream_subscribers.get_or_create(&crate::metrics::KindLabel { kind }).inc();
        Ok(Slot { hub: self.clone(), kind, owner })
    }

    /// Open subscribers per tenant (status page, `/metrics`).
    pub fn subscribers_by_tenant(&self) -> Vec<(String, usize)> {
        let mut v: Vec<_> = self.held().tenants.iter().map(|(t, n)| (t.clone(), *n)).collect();
        v.sort();
        v
    }

    /// A live receiver for a tenant.
    pub fn receiver(&self, tenant: &str) -> broadcast::Receiver<Item> {
        self.sender(tenant).subscribe()
    }
}

impl CommitObserver for Hub {
    fn committed(&self, events: &[Committed]) {
        // Runs on the writer thread: frames are built only for tenants
        // someone watches.
        let mut senders: Vec<(&str, broadcast::Sender<Item>)> = Vec::new();
        for Committed { seq, event: e, .. } in events {
            let tx = match senders.iter().find(|(t, _)| *t == e.tenant) {
                Some((_, tx)) => tx,
                None => {
                    senders.push((&e.tenant, self.sender(&e.tenant)));
                    &senders[senders.len() - 1].1
                }
            };
            if tx.receiver_count() > 0
                && let Some(item) = EventItem::from_event(*seq, e)
            {
                let _ = tx.send(Item::Event(Arc::new(item)));
            }
        }
        self.tail.committed(events);
    }

    fn presence(&self, tenant: &str, device_id: &str, online: bool) {
        let _ = self.sender(tenant).send(Item::Presence { device_id: device_id.to_string(), online });
    }
}

/// What the site log commits for one tenant (its own events and other
/// sites'), for in-process drivers such as the fleet bench: no slot, no
/// replay, just the live feed a subscriber would see. While it lives the
/// tenant counts as watched, so the site LISTENs for other sites' events.
pub struct Feed {
    rx: broadcast::Receiver<Item>,
    _interest: interest::Held,
    /// Events missed because the feed fell behind.
    pub lagged: u64,
}

/// One event of a [`Feed`].
#[derive(Debug)]
pub struct FedEvent {
    pub device_id: String,
    /// When the site that took it in received it (for another site's event,
    /// that site's clock).
    pub received_at_us: i64,
}

impl Feed {
    pub fn new(hub: &Arc<Hub>, tenant: &str) -> Self {
        Feed { rx: hub.receiver(tenant), _interest: hub.interest.hold(tenant), lagged: 0 }
    }

    /// The next committed event; `None` once the site stopped.
    pub async fn next(&mut self) -> Option<FedEvent> {
        loop {
            match self.rx.recv().await {
                Ok(Item::Event(e)) => {
                    return Some(FedEvent { device_id: e.device_id.clone(), received_at_us: e.received_at_us });
                }
                Ok(Item::Presence { .. }) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => self.lagged += n,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// One subscriber: replay after a cursor, then live, filtered.
pub(crate) struct Subscription {
    rx: broadcast::Receiver<Item>,
    pub filter: Filter,
    /// Seq of the last event delivered: the cursor a client resumes from.
    pub last_seq: i64,
    /// Everything up to here was handled by the replay (delivered or filtered).
    replayed_to: i64,
    backlog: std::collections::VecDeque<Arc<EventItem>>,
    tenant: String,
    readers: Readers,
    replaying: bool,
    _slot: Slot,
    _interest: interest::Held,
}

/// Rows read per replay page.
const REPLAY_PAGE: usize = 500;

impl Subscription {
    /// Subscribes live first, so nothing committed from now on is missed,
    /// then replays the log after `after`.
    pub(crate) fn new(hub: &Arc<Hub>, slot: Slot, readers: Readers, tenant: &str, filter: Filter, after: i64) -> Self {
        Self {
            rx: hub.receiver(tenant),
            filter,
            last_seq: after,
            replayed_to: after,
            backlog: Default::default(),
            tenant: tenant.to_string(),
            readers,
            replaying: true,
            _slot: slot,
            _interest: hub.interest.hold(tenant),
        }
    }

    /// The next item for this subscriber.
    pub(crate) async fn next(&mut self) -> Result<Item, Closed> {
        loop {
            if let Some(e) = self.backlog.pop_front() {
                self.last_seq = e.seq;
                return Ok(Item::Event(e));
            }
            if self.replaying {
                self.fill().await?;
                continue;
            }
            match self.rx.recv().await {
                Ok(Item::Event(e)) if e.seq <= self.replayed_to => {} // the replay had it
                Ok(item) if self.filter.matches(&item) => {
                    if let Item::Event(e) = &item {
                        self.last_seq = e.seq;
                    }
                    return Ok(item);
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return Err(Closed::Lagged { last_seq: self.last_seq }),
                Err(broadcast::error::RecvError::Closed) => return Err(Closed::Gone),
            }
        }
    }

    /// Reads the next replay page (up to 500 rows) into the backlog; nothing
    /// once the replay has caught up with the log.
    pub(crate) async fn fill(&mut self) -> Result<(), Closed> {
        if !self.replaying {
            return Ok(());
        }
        let (tenant, after) = (self.tenant.clone(), self.replayed_to);
        let q = schema::Query { tenant, after, limit: REPLAY_PAGE, ..Default::default() };
        let rows = self.readers.with(move |c| schema::query(c, &q)).await.map_err(|_| Closed::Gone)?;
        self.replaying = rows.len() == REPLAY_PAGE;
        if let Some(last) = rows.last() {
            self.replayed_to = last.seq;
        }
        self.backlog.extend(
            rows.iter()
                .filter(|r| self.filter.matches_event(&r.device_id, &r.event_type))
                .filter_map(EventItem::from_stored)
                .map(Arc::new),
        );
        Ok(())
    }

    /// Replaces the filters (WS `subscribe` frame); the cursor stays.
    pub(crate) fn set_filter(&mut self, filter: Filter) {
        self.filter = filter;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_matches_exactly_one_segment() {
        assert!(type_matches("alarm.*", "alarm.high"));
        assert!(!type_matches("alarm.*", "alarm"));
        assert!(!type_matches("alarm.*", "alarm.high.x"));
        assert!(type_matches("*.high", "alarm.high"));
        assert!(type_matches("temp", "temp"));
        assert!(!type_matches("temp", "temp.read"));
    }

    #[test]
    fn filters_parse_and_refuse_partial_wildcards() {
        let f = Filter::parse(Some("d1"), Some("alarm.*, temp")).unwrap();
        assert!(f.matches_event("d1", "alarm.low"));
        assert!(f.matches_event("d1", "temp"));
        assert!(!f.matches_event("d2", "temp"));
        assert!(!f.matches_event("d1", "humidity"));
        assert!(Filter::parse(None, Some("al*rm")).is_err());
        assert!(Filter::parse(None, Some("a b")).is_err());
        assert!(Filter::parse(None, None).unwrap().matches_event("x", "y"));
        // The query parameters, exactly as the document declares them.
        assert!(Filter::from_query(Some("d1"), Some("alarm.*,temp")).is_ok());
        assert!(Filter::from_query(None, Some("")).is_ok(), "empty: no filter");
        for bad in ["alarm.*, temp", "a,,b", "a..b", ".a", "al*rm", "a b"] {
            assert_eq!(Filter::from_query(None, Some(bad)).unwrap_err().0, "event_types", "{bad:?}");
        }
        for bad in ["", "d 1", "d/1", &"d".repeat(256)] {
            assert_eq!(Filter::from_query(Some(bad), None).unwrap_err().0, "device_id", "{bad:?}");
        }
        let many = vec!["a"; 65].join(",");
        assert!(Filter::from_query(None, Some(&many)).is_err());
    }
}
