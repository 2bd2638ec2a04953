//! Prometheus metrics, one registry per appliance (so tests can run several
//! in one process). Rendered at `/metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How events arrive at ingest: the `protocol` label of the ingest
/// metrics, and nothing else (the site log stores no protocol).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Protocol {
    Http,
    WebSocket,
    Mqtt,
}

impl Protocol {
    /// The metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::WebSocket => "ws",
            Protocol::Mqtt => "mqtt",
        }
    }
}

/// Label of accepted events.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    pub protocol: &'static str,
}

/// Label of stream subscribers.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Label of per-tenant figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    pub tenant: String,
}

/// Labels of rejected events.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub protocol: &'static str,
    pub reason: &'static str,
}

/// Every metric the appliance exports.
pub struct Metrics {
    registry: Registry,
    pub events_accepted: Family<ProtocolLabel, Counter>,
    pub events_duplicate: Family<ProtocolLabel, Counter>,
    pub events_rejected: Family<RejectLabels, Counter>,
    pub commit_rows: Histogram,
    pub commit_seconds: Histogram,
    pub checkpoint_seconds: Histogram,
    pub backlog_rows: Gauge,
    pub oldest_pending_seconds: Gauge<f64, AtomicU64>,
    pub log_bytes: Gauge,
    pub log_write_bytes: Counter,
    pub log_events_written: Counter,
    pub backlog_bytes: Gauge,
    pub dead_letter_rows: Gauge,
    pub uplink_up: Gauge,
    pub uplink_batch_waiting_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub log_commit_hold_seconds: Gauge<f64, AtomicU64>,
    pub disk_write_bytes_per_day: Gauge<f64, AtomicU64>,
    pub disk_endurance_days: Gauge<f64, AtomicU64>,
    pub log_write_budget: Gauge,
    pub forward_rows: Counter,
    pub forward_resent: Counter,
    pub forward_batches: Counter,
    pub forward_batch_wait_seconds: Gauge<f64, AtomicU64>,
    pub forward_retries: Counter,
    pub dead_letters: Counter,
    pub forward_rate: Gauge<f64, AtomicU64>,
    pub drain_eta_seconds: Gauge<f64, AtomicU64>,
    pub mqtt_connections: Gauge,
    pub mqtt_subscribed_sessions: Gauge,
    pub mqtt_deliveries_dropped: Counter,
    pub mqtt_fanout_skipped: Counter,
    pub mqtt_write_timeouts: Counter,
    pub mqtt_session_timers: Gauge,
    pub central_partitions: Family<TenantLabel, Gauge>,
    pub tenant_mqtt_connections: Family<TenantLabel, Gauge>,
    pub tenant_stream_subscribers: Family<TenantLabel, Gauge>,
    pub mqtt_commit_wait: Histogram,
    pub mqtt_throttled: Counter,
    pub stream_subscribers: Family<KindLabel, Gauge>,
    pub stream_delivered: Counter,
    pub stream_lagged: Counter,
    pub stream_latency: Histogram,
    pub listen_up: Gauge,
    pub remote_catchup_rows: Counter,
    pub remote_events: Counter,
    /// Queries for other sites' events sent to central (only for tenants
    /// someone here subscribes to).
    pub remote_fetches: Counter,
    /// Notifications the LISTEN connection received (a busy tenant's
    /// channel is left between fetch rounds, so this stays near the rounds).
    pub remote_notifications: Counter,
    /// Busy tenants read by fetch rounds instead of listened to.
    pub remote_muted_tenants: Gauge,
    pub remote_evicted: Counter,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outpost");
        let events_accepted = Family::<ProtocolLabel, Counter>::default();
        let events_duplicate = Family::<ProtocolLabel, Counter>::default();
        let events_rejected = Family::<RejectLabels, Counter>::default();
        let commit_rows = Histogram::new([1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0]);
        let commit_seconds = Histogram::new([0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]);
        let checkpoint_seconds = Histogram::new([0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]);
        let backlog_rows = Gauge::default();
        let oldest_pending_seconds = Gauge::<f64, AtomicU64>::default();
        let log_bytes = Gauge::default();
        registry.register("events_accepted", "Events committed to the site log", events_accepted.clone());
        registry.register(
            "events_duplicate",
            "Events whose id was already in the log (acked, not written again)",
            events_duplicate.clone(),
        );
        registry.register("events_rejected", "Events refused, by reason", events_rejected.clone());
        registry.register(
            "commit_batch_rows",
            "Events appended per group commit (groups that append none are not counted)",
            commit_rows.clone(),
        );
        registry.register("commit_duration_seconds", "Group commit latency", commit_seconds.clone());
        registry.register(
            "log_checkpoint_duration_seconds",
            "WAL checkpoints of the site log (run after the group that filled the WAL is answered)",
            checkpoint_seconds.clone(),
        );
        registry.register("backlog_rows", "Events not yet forwarded", backlog_rows.clone());
        registry.register(
            "oldest_pending_age_seconds",
            "Age of the oldest event not yet forwarded",
            oldest_pending_seconds.clone(),
        );
        registry.register("log_bytes", "Bytes used by the site log", log_bytes.clone());
        let log_commit_hold_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "log_commit_hold_seconds",
            "How long the writer holds a group open after its first request now (log.commit_delay, or what log.write_budget needs)",
            log_commit_hold_seconds.clone(),
        );
        let disk_write_bytes_per_day = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "disk_write_bytes_per_day",
            "Bytes this process writes to storage per day at the rate of the last minute (against log_write_budget_bytes_per_day)",
            disk_write_bytes_per_day.clone(),
        );
        let disk_endurance_days = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "disk_endurance_days",
            "Days until the storage's rated endurance (disk.endurance_tbw) is written at that rate (0: unknown)",
            disk_endurance_days.clone(),
        );
        let log_write_budget = Gauge::default();
        registry.register(
            "log_write_budget_bytes_per_day",
            "log.write_budget: bytes per day the site-log writer keeps its writes within (0: no budget)",
            log_write_budget.clone(),
        );
        let log_write_bytes = Counter::default();
        let log_events_written = Counter::default();
        registry.register(
            "log_write_bytes",
            "Bytes this process wrote to storage (write_bytes of /proc/self/io: WAL, checkpoints, marking)",
            log_write_bytes.clone(),
        );
        registry.register(
            "log_events_written",
            "Events written to the site log (local and remote)",
            log_events_written.clone(),
        );
        let backlog_bytes = Gauge::default();
        let dead_letter_rows = Gauge::default();
        let uplink_up = Gauge::default();
        let forward_rows = Counter::default();
        let forward_resent = Counter::default();
        let forward_batches = Counter::default();
        let forward_retries = Counter::default();
        let dead_letters = Counter::default();
        let forward_rate = Gauge::<f64, AtomicU64>::default();
        let drain_eta_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register("backlog_bytes", "Bytes of events not yet forwarded", backlog_bytes.clone());
        registry.register("dead_letter_rows", "Events in the dead-letter table", dead_letter_rows.clone());
        registry.register("uplink_up", "1 while the central database accepts batches", uplink_up.clone());
        let uplink_batch_waiting_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "uplink_batch_waiting_seconds",
            "Seconds the batch in flight has waited for central's answer, once over central.answer_timeout (0 otherwise)",
            uplink_batch_waiting_seconds.clone(),
        );
        registry.register("forwarded_rows", "Rows committed centrally", forward_rows.clone());
        registry.register(
            "forward_resent_rows",
            "Forwarded rows sent again because central no longer held them (a failover)",
            forward_resent.clone(),
        );
        registry.register("forward_batches", "Central transactions committed", forward_batches.clone());
        let forward_batch_wait_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "forward_batch_wait_seconds",
            "How long a small batch waits to coalesce now: central.batch_wait, more while central is slow to commit",
            forward_batch_wait_seconds.clone(),
        );
        registry.register(
            "forward_retries",
            "Forwarding attempts that failed and were retried",
            forward_retries.clone(),
        );
        registry.register("dead_letters", "Events moved to dead letters", dead_letters.clone());
        registry.register("forward_rate_rows_per_second", "Drain rate over the last 10 s", forward_rate.clone());
        registry.register(
            "drain_eta_seconds",
            "Backlog divided by the drain rate (0 when unknown)",
            drain_eta_seconds.clone(),
        );
        let mqtt_connections = Gauge::default();
        let mqtt_commit_wait = Histogram::new([0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]);
        let mqtt_throttled = Counter::default();
        registry.register("mqtt_connections", "Open MQTT connections", mqtt_connections.clone());
        let mqtt_subscribed_sessions = Gauge::default();
        registry.register(
            "mqtt_subscribed_sessions",
            "MQTT sessions holding at least one subscription (connected, or persistent and waiting for their client)",
            mqtt_subscribed_sessions.clone(),
        );
        let mqtt_deliveries_dropped = Counter::default();
        registry.register(
            "mqtt_deliveries_dropped",
            "Deliveries dropped, oldest first, from a session's full mailbox (mqtt.max_queued_messages / max_queued_bytes)",
            mqtt_deliveries_dropped.clone(),
        );
        let mqtt_fanout_skipped = Counter::default();
        registry.register(
            "mqtt_fanout_skipped",
            "Committed events not passed to MQTT subscribers because the fan-out queue was full (they stay in the log and on the streams)",
            mqtt_fanout_skipped.clone(),
        );
        let mqtt_session_timers = Gauge::default();
        registry.register(
            "mqtt_session_timers",
            "Timers of ended MQTT connections: persistent sessions waiting for their client, and delayed wills",
            mqtt_session_timers.clone(),
        );
        let central_partitions = Family::<TenantLabel, Gauge>::default();
        registry.register(
            "central_partitions",
            "Partitions of a tenant's central events table, as the forwarder last counted them",
            central_partitions.clone(),
        );
        let tenant_mqtt_connections = Family::<TenantLabel, Gauge>::default();
        registry.register(
            "tenant_mqtt_connections",
            "Open MQTT connections per tenant (mqtt.max_connections_per_tenant is its share)",
            tenant_mqtt_connections.clone(),
        );
        let tenant_stream_subscribers = Family::<TenantLabel, Gauge>::default();
        registry.register(
            "tenant_stream_subscribers",
            "Open stream subscribers per tenant (stream.max_subscribers_per_tenant is its share)",
            tenant_stream_subscribers.clone(),
        );
        let mqtt_write_timeouts = Counter::default();
        registry.register(
            "mqtt_write_timeouts",
            "MQTT connections closed because their client stopped reading (mqtt.write_timeout)",
            mqtt_write_timeouts.clone(),
        );
        registry.register(
            "mqtt_commit_wait_seconds",
            "From reading a PUBLISH to its commit (the PUBACK follows)",
            mqtt_commit_wait.clone(),
        );
        registry.register(
            "mqtt_throttled",
            "Times a connection stopped being read because of a rate limit",
            mqtt_throttled.clone(),
        );
        let stream_subscribers = Family::<KindLabel, Gauge>::default();
        let stream_delivered = Counter::default();
        let stream_lagged = Counter::default();
        let stream_latency = Histogram::new([0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]);
        let listen_up = Gauge::default();
        let remote_catchup_rows = Counter::default();
        let remote_events = Counter::default();
        let remote_fetches = Counter::default();
        let remote_notifications = Counter::default();
        let remote_muted_tenants = Gauge::default();
        let remote_evicted = Counter::default();
        registry.register("stream_subscribers", "Open stream subscribers by kind", stream_subscribers.clone());
        registry.register("stream_delivered", "Events delivered to stream subscribers", stream_delivered.clone());
        registry.register("stream_lagged_disconnects", "Subscribers closed for falling behind", stream_lagged.clone());
        registry.register(
            "stream_latency_seconds",
            "From an event's receipt (at its origin site) to its delivery",
            stream_latency.clone(),
        );
        registry.register(
            "listen_up",
            "0 while the central LISTEN connection is down (it is only open while someone here subscribes)",
            listen_up.clone(),
        );
        registry.register(
            "remote_catchup_rows",
            "Remote events copied by catch-up after (re)connects",
            remote_catchup_rows.clone(),
        );
        registry.register("remote_events", "Remote events stored from the central database", remote_events.clone());
        registry.register(
            "remote_fetches",
            "Queries for other sites' events sent to the central database (only for tenants with a local subscriber)",
            remote_fetches.clone(),
        );
        registry.register(
            "remote_notifications",
            "Notifications received from the central database on the LISTEN connection",
            remote_notifications.clone(),
        );
        registry.register(
            "remote_muted_tenants",
            "Busy tenants read every fetch round instead of listened to (per_batch); 0 when every tenant is listened to",
            remote_muted_tenants.clone(),
        );
        registry.register(
            "remote_evicted",
            "Remote events evicted to keep them within log.remote_max_bytes (they stay in the central database)",
            remote_evicted.clone(),
        );
        Self {
            registry,
            stream_subscribers,
            stream_delivered,
            stream_lagged,
            stream_latency,
            listen_up,
            remote_catchup_rows,
            remote_events,
            remote_fetches,
            remote_notifications,
            remote_muted_tenants,
            remote_evicted,
            mqtt_connections,
            mqtt_subscribed_sessions,
            mqtt_deliveries_dropped,
            mqtt_fanout_skipped,
            mqtt_write_timeouts,
            mqtt_session_timers,
            central_partitions,
            tenant_mqtt_connections,
            tenant_stream_subscribers,
            mqtt_commit_wait,
            mqtt_throttled,
            backlog_bytes,
            dead_letter_rows,
            uplink_up,
            uplink_batch_waiting_seconds,
            log_commit_hold_seconds,
            disk_write_bytes_per_day,
            disk_endurance_days,
            log_write_budget,
            forward_rows,
            forward_resent,
            forward_batches,
            forward_batch_wait_seconds,
            forward_retries,
            dead_letters,
            forward_rate,
            drain_eta_seconds,
            events_accepted,
            events_duplicate,
            events_rejected,
            commit_rows,
            commit_seconds,
            checkpoint_seconds,
            backlog_rows,
            oldest_pending_seconds,
            log_bytes,
            log_write_bytes,
            log_events_written,
        }
    }

    /// Counts `n` rejected events.
    pub fn reject(&self, protocol: Protocol, reason: &'static str, n: u64) {
        self.events_rejected.get_or_create(&RejectLabels { protocol: protocol.as_str(), reason }).inc_by(n);
    }

    /// Moves `log_write_bytes` up to `total`, a fresh reading of the
    /// process's bytes written (a counter only ever goes up).
    pub fn observe_write_bytes(&self, total: u64) {
        let seen = self.log_write_bytes.get();
        if total > seen {
            self.log_write_bytes.inc_by(total - seen);
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            tracing::warn!("metrics encoding failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
