//! Who receives what: every MQTT session's subscriptions, a bounded mailbox
//! of deliveries per session, and the tenants' retained messages.
//!
//! The site log is the store; this holds only a delivery window. Committed
//! events reach it from the writer (`Feed`, any protocol) and are matched
//! against the subscriptions of their tenant's sessions; each match is
//! queued in that session's mailbox (QoS = min(publish QoS, the best
//! matching subscription's), with the matching subscription identifiers),
//! and the session's connection takes from its mailbox as its client's
//! Receive Maximum and its socket allow.
//!
//! Invariants:
//! - Memory is bounded by configuration, whatever a device does: filters
//!   per session (`mqtt.max_filters`, each at most `mqtt.max_topic_length`),
//!   queued deliveries per session (`mqtt.max_queued_messages` and
//!   `mqtt.max_queued_bytes`; beyond them the oldest is dropped and
//!   counted), deliveries in flight (the client's Receive Maximum, held to
//!   `mqtt.max_inflight`), and retained messages per tenant (count and
//!   bytes). An unsubscribed filter is gone; a session that ends leaves
//!   nothing behind.
//! - A mailbox outlives its connection only for a persistent session: what
//!   arrives while the client is away waits (bounded), and what was in
//!   flight is sent again when it returns.
//! - Nothing here waits: publishing is a few short locks per subscriber of
//!   the tenant, done off the writer thread.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Instant;

use bytes::Bytes;
use rumqttd::protocol::PublishProperties;
use tokio::sync::{Notify, mpsc};

use super::acl::{Matched, stream_parts, stream_topic, subscription, topic_matches};
use super::topic_map::TopicMaps;
use crate::config::MqttConfig;
use crate::event::Event;
use crate::log::mqtt::{Facts, Published};
use crate::log::{CommitObserver, Committed};
use crate::metrics::Metrics;
use crate::stream::interest::Interest;

/// A message to fan out: a committed event on its stream topic (or on a
/// topic of a device's own layout, for layout subscriptions).
#[derive(Debug)]
pub(crate) struct Message {
    pub topic: Bytes,
    /// On a layout topic: the stream topic it is the event of (what the
    /// delivery ACL checks).
    pub stream: Option<Bytes>,
    pub payload: Bytes,
    /// The publisher's QoS (events that did not come over MQTT: 1).
    pub qos: u8,
    /// The publisher's RETAIN.
    pub retain: bool,
    /// 5.0 properties passed on to subscribers (content type, user
    /// properties, message expiry, response topic, correlation data).
    pub props: Option<PublishProperties>,
    /// The publishing session's mailbox id, for No Local (0: none).
    pub origin: u64,
    /// When it was published (Message Expiry counts from here).
    pub at: Instant,
}

impl Message {
    /// Bytes it holds (what the bounds count).
    pub(crate) fn size(&self) -> usize {
        64 + self.topic.len() + self.payload.len() + self.props.as_ref().map_or(0, props_size)
    }

    /// Seconds of its Message Expiry Interval left; `None` when it has none,
    /// `Some(0)` when it expired.
    pub(crate) fn expiry_left(&self) -> Option<u32> {
        let interval = self.props.as_ref()?.message_expiry_interval?;
        let gone = u32::try_from(self.at.elapsed().as_secs()).unwrap_or(u32::MAX);
        Some(interval.saturating_sub(gone))
    }

    /// The topic the delivery ACL checks: the stream topic of the event.
    pub(crate) fn stream_topic(&self) -> &[u8] {
        self.stream.as_ref().unwrap_or(&self.topic)
    }

    /// The same message on each of its event's layout topics (see
    /// [`TopicMaps::layouts`]).
    fn on_layouts(&self, tenant: &str, topics: &TopicMaps) -> Vec<Arc<Message>> {
        let stream = std::str::from_utf8(&self.topic).unwrap_or("");
        let Some((device, event_type)) = stream_parts(stream, tenant) else { return Vec::new() };
        topics
            .layouts(tenant, device, event_type)
            .into_iter()
            .map(|topic| {
                Arc::new(Message {
                    topic: Bytes::from(topic),
                    stream: Some(self.topic.clone()),
                    payload: self.payload.clone(),
                    qos: self.qos,
                    retain: self.retain,
                    props: self.props.clone(),
                    origin: self.origin,
                    at: self.at,
                })
            })
            .collect()
    }
}

fn props_size(p: &PublishProperties) -> usize {
    p.response_topic.as_ref().map_or(0, String::len)
        + p.content_type.as_ref().map_or(0, String::len)
        + p.correlation_data.as_ref().map_or(0, Bytes::len)
        + p.user_properties.iter().map(|(k, v)| 16 + k.len() + v.len()).sum::<usize>()
}

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Subscription {
    pub filter: String,
    /// The QoS granted.
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 5.0 subscription identifier.
    pub id: Option<usize>,
    /// Matched on the devices' own layouts (`mqtt.topic_maps`), not on the
    /// stream: decided by `acl::subscription`, not stored.
    pub layout: bool,
    /// The feed's number when the subscription was made (set by
    /// `Fanout::subscribe`): messages fed up to it were published before
    /// it, so are not for it (the retained ones reach it as retained).
    pub since: u64,
}

/// A delivery decided for a session, not yet sent.
#[derive(Debug, Clone)]
pub(crate) struct Queued {
    pub msg: Arc<Message>,
    /// min(publish QoS, granted QoS).
    pub qos: u8,
    pub retain: bool,
    pub sub_ids: Vec<usize>,
}

/// A delivery sent with QoS > 0 and not completed by the client.
#[derive(Debug, Clone)]
pub(crate) struct Inflight {
    pub queued: Queued,
    /// QoS 2: PUBREC came and PUBREL was sent (a resend is the PUBREL).
    pub released: bool,
}

/// Bounds of one mailbox.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MailboxLimits {
    pub max_filters: usize,
    pub max_messages: usize,
    pub max_bytes: usize,
}

/// A session's subscriptions and deliveries.
pub(crate) struct Mailbox {
    /// Unique per session (kept across its connections), for No Local.
    pub id: u64,
    pub tenant: String,
    limits: MailboxLimits,
    inner: Mutex<Inner>,
    /// Told when a delivery was queued (one waiter: the connection).
    notify: Notify,
    dropped: prometheus_client::metrics::counter::Counter,
}

/// What a mailbox holds (behind its lock).
#[derive(Default)]
pub(crate) struct Inner {
    pub subs: Vec<Subscription>,
    pub queue: VecDeque<Queued>,
    queued_bytes: usize,
    /// In flight by packet id, in send order, and their bytes (which count
    /// against the same bound as the queue).
    inflight: VecDeque<(u16, Inflight)>,
    inflight_bytes: usize,
    next_pkid: u16,
}

impl Inner {
    /// Takes the next queued delivery.
    pub(crate) fn pop(&mut self) -> Option<Queued> {
        let q = self.queue.pop_front()?;
        self.queued_bytes = self.queued_bytes.saturating_sub(q.msg.size());
        Some(q)
    }

    /// A packet id no delivery in flight uses (1..=65535).
    pub(crate) fn next_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            let p = self.next_pkid;
            if !self.inflight.iter().any(|(q, _)| *q == p) {
                return p;
            }
        }
    }

    /// Whether another QoS > 0 delivery may go out: fewer than `max` in
    /// flight, and their bytes within the mailbox's bound.
    pub(crate) fn may_send_more(&self, max: usize, max_bytes: usize) -> bool {
        self.inflight.len() < max && self.inflight_bytes < max_bytes
    }

    /// Sends `q` with a new packet id: it stays in flight until completed.
    pub(crate) fn send(&mut self, q: &Queued) -> u16 {
        let pkid = self.next_pkid();
        self.inflight_bytes += q.msg.size();
        self.inflight.push_back((pkid, Inflight { queued: q.clone(), released: false }));
        pkid
    }

    /// What is in flight, in send order (to send again on a resume).
    pub(crate) fn in_flight(&self) -> Vec<(u16, Inflight)> {
        self.inflight.iter().cloned().collect()
    }

    /// The in-flight delivery with packet id `pkid`.
    pub(crate) fn inflight_mut(&mut self, pkid: u16) -> Option<&mut Inflight> {
        self.inflight.iter_mut().find(|(p, _)| *p == pkid).map(|(_, i)| i)
    }

    /// Completes (removes) the in-flight delivery `pkid`.
    pub(crate) fn complete(&mut self, pkid: u16) -> Option<Inflight> {
        let at = self.inflight.iter().position(|(p, _)| *p == pkid)?;
        let (_, done) = self.inflight.remove(at)?;
        self.inflight_bytes = self.inflight_bytes.saturating_sub(done.queued.msg.size());
        Some(done)
    }
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The mailbox's state, locked (for the connection that owns it).
    pub(crate) fn inner(&self) -> MutexGuard<'_, Inner> {
        self.lock()
    }

    /// Waits until something was queued since the last wait.
    pub(crate) async fn queued(&self) {
        self.notify.notified().await;
    }

    #[cfg(test)]
    /// Whether deliveries wait.
    pub(crate) fn has_queued(&self) -> bool {
        !self.lock().queue.is_empty()
    }

    /// Its subscriptions now.
    pub(crate) fn subscriptions(&self) -> Vec<Subscription> {
        self.lock().subs.clone()
    }

    /// Matches `msg`, the feed's message number `fed`, against the
    /// subscriptions made before it and queues the delivery: one on its
    /// stream topic for the stream subscriptions that match, and one on
    /// each of its layout topics (`layouts`, made when first asked) for the
    /// layout subscriptions that match that.
    fn offer<'m>(&self, msg: &Arc<Message>, fed: u64, layouts: impl FnOnce() -> &'m [Arc<Message>]) {
        let mut inner = self.lock();
        let mut queued = false;
        if let Some(q) = self.decide(&inner.subs, msg, fed, false) {
            self.push(&mut inner, q);
            queued = true;
        }
        if inner.subs.iter().any(|s| s.layout) {
            for m in layouts() {
                if let Some(q) = self.decide(&inner.subs, m, fed, true) {
                    self.push(&mut inner, q);
                    queued = true;
                }
            }
        }
        drop(inner);
        if queued {
            self.notify.notify_one();
        }
    }

    /// The delivery of `msg` for the subscriptions (stream or `layout`)
    /// made before `fed` that match its topic, if any.
    fn decide(&self, subs: &[Subscription], msg: &Arc<Message>, fed: u64, layout: bool) -> Option<Queued> {
        let topic = std::str::from_utf8(&msg.topic).unwrap_or("");
        let matching: Vec<&Subscription> =
            subs.iter().filter(|s| s.layout == layout && s.since < fed && topic_matches(topic, &s.filter)).collect();
        if matching.is_empty() || (msg.origin == self.id && matching.iter().all(|s| s.no_local)) {
            return None;
        }
        let granted = matching.iter().map(|s| s.qos).max().unwrap_or(0);
        Some(Queued {
            msg: msg.clone(),
            qos: msg.qos.min(granted),
            retain: msg.retain && matching.iter().any(|s| s.retain_as_published),
            sub_ids: matching.iter().filter_map(|s| s.id).collect(),
        })
    }

    /// The byte bound of what it holds (queued and in flight).
    pub(crate) fn max_bytes(&self) -> usize {
        self.limits.max_bytes
    }

    /// Queues a delivery, dropping the oldest beyond the bounds (deliveries
    /// in flight count against the byte bound too).
    fn push(&self, inner: &mut Inner, q: Queued) {
        inner.queued_bytes += q.msg.size();
        inner.queue.push_back(q);
        while inner.queue.len() > self.limits.max_messages
            || inner.queued_bytes + inner.inflight_bytes > self.limits.max_bytes
        {
            let Some(old) = inner.queue.pop_front() else { break };
            inner.queued_bytes = inner.queued_bytes.saturating_sub(old.msg.size());
            self.dropped.inc();
        }
    }

    /// Queues retained messages for a new subscription (RETAIN set).
    pub(crate) fn queue_retained(&self, sub: &Subscription, retained: Vec<Arc<Message>>) {
        if retained.is_empty() {
            return;
        }
        let mut inner = self.lock();
        for msg in retained {
            let queued = Queued { qos: msg.qos.min(sub.qos), retain: true, sub_ids: sub.id.into_iter().collect(), msg };
            self.push(&mut inner, queued);
        }
        drop(inner);
        self.notify.notify_one();
    }
}

/// What a SUBSCRIBE changed.
pub(crate) enum Subscribed {
    /// A filter the session did not have.
    New,
    /// An existing filter, its options replaced.
    Replaced,
    /// Over `mqtt.max_filters`.
    Full,
}

/// Retained messages of one tenant.
#[derive(Default)]
struct Retained {
    topics: HashMap<String, Arc<Message>>,
    bytes: usize,
}

/// The fan-out of one appliance.
pub(crate) struct Fanout {
    /// Mailboxes with at least one subscription, per tenant.
    tenants: RwLock<HashMap<String, Vec<Arc<Mailbox>>>>,
    retained: Mutex<HashMap<String, Retained>>,
    /// Sizes reserved for retained publishes not committed yet.
    limits: MailboxLimits,
    max_retained: usize,
    max_retained_bytes: usize,
    /// `mqtt.topic_maps`, for layout subscriptions.
    topics: Arc<TopicMaps>,
    next_id: AtomicU64,
    /// Messages fed so far: each takes the next number, and a subscription
    /// takes the current one (`Subscription::since`).
    fed: AtomicU64,
    interest: Arc<Interest>,
    metrics: Arc<Metrics>,
}

impl Fanout {
    pub(crate) fn new(
        config: &MqttConfig,
        topics: Arc<TopicMaps>,
        interest: Arc<Interest>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            tenants: RwLock::default(),
            retained: Mutex::default(),
            limits: MailboxLimits {
                max_filters: config.max_filters,
                max_messages: config.max_queued_messages,
                max_bytes: config.max_queued_bytes,
            },
            max_retained: config.max_retained_per_tenant,
            max_retained_bytes: config.max_retained_bytes_per_tenant,
            topics,
            next_id: AtomicU64::new(1),
            fed: AtomicU64::new(0),
            interest,
            metrics,
        }
    }

    /// A new, empty mailbox for a session of `tenant`.
    pub(crate) fn mailbox(&self, tenant: &str) -> Arc<Mailbox> {
        Arc::new(Mailbox {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            tenant: tenant.to_string(),
            limits: self.limits,
            inner: Mutex::default(),
            notify: Notify::new(),
            dropped: self.metrics.mqtt_deliveries_dropped.clone(),
        })
    }

    #[cfg(test)]
    /// Deliveries dropped from full mailboxes so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.metrics.mqtt_deliveries_dropped.get()
    }

    /// Adds or replaces a subscription of `mb`; it then receives its tenant's
    /// messages that match.
    pub(crate) fn subscribe(&self, mb: &Arc<Mailbox>, sub: Subscription) -> Subscribed {
        let mut inner = mb.lock();
        let was_empty = inner.subs.is_empty();
        let outcome = match inner.subs.iter().position(|s| s.filter == sub.filter) {
            Some(at) => {
                // The filter was already subscribed: what was fed since keeps matching.
                inner.subs[at] = Subscription { since: inner.subs[at].since, ..sub };
                Subscribed::Replaced
            }
            None if inner.subs.len() >= mb.limits.max_filters => Subscribed::Full,
            None => {
                inner.subs.push(Subscription { since: self.fed.load(Ordering::Acquire), ..sub });
                Subscribed::New
            }
        };
        if was_empty && !inner.subs.is_empty() {
            drop(inner);
            self.register(mb);
        }
        outcome
    }

    /// Removes a subscription; false when `mb` had no such filter.
    pub(crate) fn unsubscribe(&self, mb: &Arc<Mailbox>, filter: &str) -> bool {
        let mut inner = mb.lock();
        let Some(at) = inner.subs.iter().position(|s| s.filter == filter) else { return false };
        inner.subs.remove(at);
        if inner.subs.is_empty() {
            drop(inner);
            self.unregister(mb);
        }
        true
    }

    /// The topic maps layout subscriptions are matched with.
    pub(crate) fn topics(&self) -> &Arc<TopicMaps> {
        &self.topics
    }

    /// Puts back the subscriptions of a session of `device_id` resumed
    /// after a restart, each checked again (the topic maps may have
    /// changed since): one no longer allowed is dropped and logged.
    pub(crate) fn restore(&self, mb: &Arc<Mailbox>, device_id: &str, subs: Vec<Subscription>) {
        for s in subs {
            match subscription(&s.filter, &mb.tenant, device_id, &self.topics) {
                Ok(matched) => {
                    self.subscribe(mb, Subscription { layout: matched == Matched::Layout, ..s });
                }
                Err(why) => {
                    tracing::warn!(
                        tenant = mb.tenant,
                        device_id,
                        filter = s.filter,
                        why,
                        "stored subscription no longer allowed; dropped"
                    );
                }
            }
        }
    }

    /// The session of `mb` ended: it receives nothing more, and what it
    /// held is freed once its last handle goes.
    pub(crate) fn close(&self, mb: &Arc<Mailbox>) {
        let had = {
            let mut inner = mb.lock();
            let had = !inner.subs.is_empty();
            inner.subs.clear();
            inner.queue.clear();
            inner.queued_bytes = 0;
            inner.inflight.clear();
            inner.inflight_bytes = 0;
            had
        };
        if had {
            self.unregister(mb);
        }
    }

    fn register(&self, mb: &Arc<Mailbox>) {
        let mut t = self.tenants.write().unwrap_or_else(PoisonError::into_inner);
        t.entry(mb.tenant.clone()).or_default().push(mb.clone());
        self.interest.enter(&mb.tenant);
        self.metrics.mqtt_subscribed_sessions.inc();
    }

    fn unregister(&self, mb: &Arc<Mailbox>) {
        let mut t = self.tenants.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = t.get_mut(&mb.tenant) {
            let before = list.len();
            list.retain(|m| !Arc::ptr_eq(m, mb));
            if list.len() < before {
                self.interest.leave(&mb.tenant);
                self.metrics.mqtt_subscribed_sessions.dec();
            }
            if list.is_empty() {
                t.remove(&mb.tenant);
            }
        }
    }

    /// Whether a session of `tenant` subscribes to anything.
    pub(crate) fn has_subscribers(&self, tenant: &str) -> bool {
        self.tenants.read().unwrap_or_else(PoisonError::into_inner).contains_key(tenant)
    }

    #[cfg(test)]
    /// Sessions subscribed, over all tenants.
    pub(crate) fn subscribers(&self) -> usize {
        self.tenants.read().unwrap_or_else(PoisonError::into_inner).values().map(Vec::len).sum()
    }

    /// The next message number of the feed (see `Subscription::since`).
    pub(crate) fn number(&self) -> u64 {
        self.fed.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Queues `msg`, numbered `fed` (by [`Fanout::number`]), for every
    /// session of `tenant` it matches.
    pub(crate) fn publish(&self, tenant: &str, msg: &Arc<Message>, fed: u64) {
        let mailboxes = match self.tenants.read().unwrap_or_else(PoisonError::into_inner).get(tenant) {
            Some(list) => list.clone(),
            None => return,
        };
        let layouts = std::cell::OnceCell::new();
        for mb in mailboxes {
            mb.offer(msg, fed, || layouts.get_or_init(|| msg.on_layouts(tenant, &self.topics)));
        }
    }

    /// Whether a retained message of `bytes` fits the tenant's bounds on
    /// `topic` (replacing what it holds there).
    pub(crate) fn retain_fits(&self, tenant: &str, topic: &str, bytes: usize) -> bool {
        let r = self.retained.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(t) = r.get(tenant) else { return bytes <= self.max_retained_bytes && self.max_retained > 0 };
        let old = t.topics.get(topic).map(|m| m.payload.len());
        let count = t.topics.len() + usize::from(old.is_none());
        count <= self.max_retained && t.bytes - old.unwrap_or(0) + bytes <= self.max_retained_bytes
    }

    /// Sets (a message with a payload) or clears (`None`) the retained
    /// message of a topic; false when it does not fit the tenant's bounds.
    pub(crate) fn set_retained(&self, tenant: &str, topic: &str, msg: Option<Arc<Message>>) -> bool {
        let mut r = self.retained.lock().unwrap_or_else(PoisonError::into_inner);
        let t = r.entry(tenant.to_string()).or_default();
        let old = t.topics.get(topic).map_or(0, |m| m.payload.len());
        match msg {
            None => {
                if t.topics.remove(topic).is_some() {
                    t.bytes -= old;
                }
                if t.topics.is_empty() {
                    r.remove(tenant);
                }
                true
            }
            Some(m) => {
                let count = t.topics.len() + usize::from(!t.topics.contains_key(topic));
                let bytes = t.bytes - old + m.payload.len();
                if count > self.max_retained || bytes > self.max_retained_bytes {
                    return false;
                }
                t.bytes = bytes;
                t.topics.insert(topic.to_string(), m);
                true
            }
        }
    }

    /// The retained messages of `tenant` that `sub` matches (on their
    /// layout topics for a layout subscription).
    pub(crate) fn retained_for(&self, tenant: &str, sub: &Subscription) -> Vec<Arc<Message>> {
        let r = self.retained.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(t) = r.get(tenant) else { return Vec::new() };
        let matches = |m: &Arc<Message>| topic_matches(std::str::from_utf8(&m.topic).unwrap_or(""), &sub.filter);
        if sub.layout {
            t.topics.values().flat_map(|m| m.on_layouts(tenant, &self.topics)).filter(matches).collect()
        } else {
            t.topics.values().filter(|m| matches(m)).cloned().collect()
        }
    }
}

/// Feeds committed events to the fan-out (a `CommitObserver`, on the
/// writer thread): retained messages are set at once, and events of
/// tenants with subscribers go to the fan-out task through a bounded
/// queue (full: skipped for MQTT subscribers and counted; the event is in
/// the log and on the other streams).
pub(crate) struct Feed {
    fanout: Arc<Fanout>,
    tx: mpsc::Sender<(String, Arc<Message>, u64)>,
    metrics: Arc<Metrics>,
}

/// Messages waiting for the fan-out task.
const FEED_QUEUE: usize = 4096;

impl Feed {
    /// The feed and the task that fans out what it is fed.
    pub(crate) fn new(
        fanout: Arc<Fanout>,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, impl Future<Output = ()> + Send + 'static) {
        let (tx, mut rx) = mpsc::channel::<(String, Arc<Message>, u64)>(FEED_QUEUE);
        let f = fanout.clone();
        let task = async move {
            while let Some((tenant, msg, fed)) = rx.recv().await {
                f.publish(&tenant, &msg, fed);
            }
        };
        (Arc::new(Self { fanout, tx, metrics }), task)
    }

    fn message(e: &Event, facts: Option<&Facts>) -> Arc<Message> {
        let p = facts.and_then(|m| m.published.clone()).unwrap_or(Published {
            qos: 1,
            retain: false,
            origin: 0,
            props: None,
        });
        Arc::new(Message {
            topic: Bytes::from(stream_topic(&e.tenant, &e.device_id, &e.event_type)),
            stream: None,
            // What the device sent, byte for byte (see `crate::payload`).
            payload: Bytes::copy_from_slice(&crate::payload::original(&e.payload, e.properties.as_deref())),
            qos: p.qos,
            retain: p.retain,
            props: p.props,
            origin: p.origin,
            at: Instant::now(),
        })
    }
}

impl CommitObserver for Feed {
    fn committed(&self, events: &[Committed]) {
        for Committed { event: e, mqtt, .. } in events {
            let retained_topic = mqtt.as_ref().and_then(|m| m.retain_topic.as_deref());
            let subscribed = self.fanout.has_subscribers(&e.tenant);
            if retained_topic.is_none() && !subscribed {
                continue;
            }
            let msg = Self::message(e, mqtt.as_deref());
            if let Some(topic) = retained_topic {
                self.fanout.set_retained(&e.tenant, topic, Some(msg.clone()));
            }
            // Numbered here, before the publisher's ack (the writer calls
            // observers first): a subscription made after the ack is not
            // matched by it, even if the fan-out task is behind.
            if subscribed && self.tx.try_send((e.tenant.clone(), msg, self.fanout.number())).is_err() {
                self.metrics.mqtt_fanout_skipped.inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fanout(max_filters: usize, max_messages: usize) -> Fanout {
        let config = MqttConfig {
            max_filters,
            max_queued_messages: max_messages,
            max_queued_bytes: 1 << 20,
            max_retained_per_tenant: 2,
            max_retained_bytes_per_tenant: 10,
            ..MqttConfig::default()
        };
        Fanout::new(&config, Arc::default(), Arc::default(), Arc::new(Metrics::new()))
    }

    fn sub(filter: &str, qos: u8) -> Subscription {
        Subscription {
            filter: filter.into(),
            qos,
            no_local: false,
            retain_as_published: false,
            id: None,
            layout: false,
            since: 0,
        }
    }

    fn msg(topic: &str, qos: u8, origin: u64) -> Arc<Message> {
        Arc::new(Message {
            topic: Bytes::from(topic.to_string()),
            stream: None,
            payload: Bytes::from_static(b"{}"),
            qos,
            retain: false,
            props: None,
            origin,
            at: Instant::now(),
        })
    }

    #[test]
    fn deliveries_go_at_the_lower_qos_once_per_session_with_every_matching_id() {
        let f = fanout(8, 10);
        let mb = f.mailbox("acme");
        f.subscribe(&mb, Subscription { id: Some(1), ..sub("acme/events/#", 1) });
        f.subscribe(&mb, Subscription { id: Some(2), ..sub("acme/events/d1/+", 2) });
        f.publish("acme", &msg("acme/events/d1/t", 2, 0), f.number());
        f.publish("acme", &msg("acme/events/d2/t", 2, 0), f.number());
        f.publish("globex", &msg("acme/events/d1/t", 2, 0), f.number());
        let mut inner = mb.inner();
        let a = inner.pop().unwrap();
        assert_eq!((a.qos, a.sub_ids.clone()), (2, vec![1, 2]));
        let b = inner.pop().unwrap();
        assert_eq!((b.qos, b.sub_ids.clone()), (1, vec![1]));
        assert!(inner.pop().is_none(), "other tenants' messages never reach it");
    }

    #[test]
    fn filters_are_bounded_and_freed_with_the_last_subscription() {
        let f = fanout(2, 10);
        let mb = f.mailbox("acme");
        assert!(matches!(f.subscribe(&mb, sub("acme/events/a", 0)), Subscribed::New));
        assert!(matches!(f.subscribe(&mb, sub("acme/events/a", 1)), Subscribed::Replaced));
        assert!(matches!(f.subscribe(&mb, sub("acme/events/b", 0)), Subscribed::New));
        assert!(matches!(f.subscribe(&mb, sub("acme/events/c", 0)), Subscribed::Full));
        assert!(f.has_subscribers("acme"));
        assert!(f.unsubscribe(&mb, "acme/events/a"));
        assert!(!f.unsubscribe(&mb, "acme/events/a"), "no longer there");
        assert!(f.unsubscribe(&mb, "acme/events/b"));
        assert!(!f.has_subscribers("acme"), "a session without filters is not kept");
        assert_eq!(f.subscribers(), 0);
    }

    #[test]
    fn a_full_mailbox_drops_its_oldest_and_counts_them() {
        let f = fanout(8, 3);
        let mb = f.mailbox("acme");
        f.subscribe(&mb, sub("acme/#", 1));
        for i in 0..5 {
            f.publish("acme", &msg(&format!("acme/events/d/{i}"), 1, 0), f.number());
        }
        let topics: Vec<_> = std::iter::from_fn(|| mb.inner().pop()).map(|q| q.msg.topic.clone()).collect();
        assert_eq!(topics, ["acme/events/d/2", "acme/events/d/3", "acme/events/d/4"]);
        assert_eq!(f.dropped(), 2);
    }

    #[test]
    fn layout_subscriptions_get_the_event_on_its_layout_topic_within_the_tenant() {
        use crate::config::TopicMapRule;
        let rules = [TopicMapRule { pattern: "shellies/{device}/{type..}".into(), event_type: None }];
        let config = MqttConfig { max_retained_per_tenant: 4, ..MqttConfig::default() };
        let topics = Arc::new(TopicMaps::new(&rules).unwrap());
        let f = Fanout::new(&config, topics, Arc::default(), Arc::new(Metrics::new()));
        let mb = f.mailbox("acme");
        let layout = |filter: &str, id| Subscription { id: Some(id), layout: true, ..sub(filter, 1) };
        f.subscribe(&mb, layout("shellies/relay-1/relay/0/command", 1));
        f.subscribe(&mb, layout("shellies/+/relay/#", 2));
        f.subscribe(&mb, Subscription { id: Some(3), ..sub("acme/events/#", 1) });
        f.publish("acme", &msg("acme/events/relay-1/relay.0.command", 1, 0), f.number());
        f.publish("acme", &msg("acme/events/relay-1/temperature", 1, 0), f.number());
        f.publish("globex", &msg("globex/events/relay-1/relay.0.command", 1, 0), f.number());
        let got: Vec<(String, Vec<usize>, Option<Bytes>)> = std::iter::from_fn(|| mb.inner().pop())
            .map(|q| (String::from_utf8_lossy(&q.msg.topic).into_owned(), q.sub_ids, q.msg.stream.clone()))
            .collect();
        let stream = |t: &str| Some(Bytes::from(t.to_string()));
        assert_eq!(
            got,
            [
                ("acme/events/relay-1/relay.0.command".into(), vec![3], None),
                ("shellies/relay-1/relay/0/command".into(), vec![1, 2], stream("acme/events/relay-1/relay.0.command")),
                ("acme/events/relay-1/temperature".into(), vec![3], None),
            ],
            "one delivery per topic; the layout topic keeps its stream topic for the ACL; globex's never"
        );
        // A retained event reaches a later layout subscription on its layout topic.
        let retained =
            Arc::new(Message { retain: true, ..Arc::into_inner(msg("acme/events/relay-1/relay.0", 1, 0)).unwrap() });
        assert!(f.set_retained("acme", "acme/events/relay-1/relay.0", Some(retained)));
        let topics: Vec<Bytes> =
            f.retained_for("acme", &layout("shellies/relay-1/#", 4)).iter().map(|m| m.topic.clone()).collect();
        assert_eq!(topics, [Bytes::from_static(b"shellies/relay-1/relay/0")]);
        assert!(f.retained_for("globex", &layout("shellies/relay-1/#", 4)).is_empty());
    }

    #[test]
    fn a_subscription_gets_only_what_was_fed_after_it() {
        let f = fanout(4, 8);
        let mb = f.mailbox("acme");
        f.subscribe(&mb, sub("acme/events/d0/x", 1)); // the tenant has a subscriber
        let before = f.number(); // fed (and acked) before the next subscription
        f.subscribe(&mb, sub("acme/#", 1));
        f.publish("acme", &msg("acme/events/d1/t", 1, 0), before);
        assert!(mb.inner().pop().is_none(), "a message fed before the subscription was matched by it");
        f.publish("acme", &msg("acme/events/d1/t", 1, 0), f.number());
        assert!(mb.inner().pop().is_some());
        // Subscribing again to the same filter keeps what it had.
        let between = f.number();
        f.subscribe(&mb, sub("acme/#", 2));
        f.publish("acme", &msg("acme/events/d1/t", 1, 0), between);
        assert!(mb.inner().pop().is_some(), "a replaced subscription lost a message fed before it was replaced");
    }

    #[test]
    fn no_local_skips_the_sessions_own_publishes() {
        let f = fanout(8, 10);
        let mb = f.mailbox("acme");
        f.subscribe(&mb, Subscription { no_local: true, ..sub("acme/#", 1) });
        f.publish("acme", &msg("acme/events/d/t", 1, mb.id), f.number());
        assert!(!mb.has_queued());
        f.publish("acme", &msg("acme/events/d/t", 1, mb.id + 1), f.number());
        assert!(mb.has_queued());
    }

    #[test]
    fn retained_messages_are_bounded_by_count_and_bytes_per_tenant() {
        let f = fanout(8, 10);
        let m = |n: usize| {
            Some(Arc::new(Message {
                topic: Bytes::new(),
                stream: None,
                payload: Bytes::from(vec![b'x'; n]),
                qos: 1,
                retain: true,
                props: None,
                origin: 0,
                at: Instant::now(),
            }))
        };
        assert!(f.set_retained("acme", "a", m(4)));
        assert!(f.set_retained("acme", "b", m(4)));
        assert!(!f.retain_fits("acme", "c", 1), "count");
        assert!(!f.set_retained("acme", "c", m(1)), "count");
        assert!(!f.set_retained("acme", "a", m(7)), "bytes");
        assert!(f.set_retained("acme", "a", m(6)), "replacing counts the difference");
        assert!(f.set_retained("acme", "b", None), "a clear");
        assert!(f.set_retained("acme", "c", m(1)));
        assert!(f.set_retained("globex", "a", m(10)), "tenants are bounded apart");
        assert_eq!(f.retained_for("acme", &sub("#", 1)).len(), 2);
    }
}
