//! Configuration: one TOML file (every key optional, see `config/outpost.toml`)
//! overlaid by `OUTPOST_<SECTION>__<KEY>` environment variables. Unknown keys
//! are errors; `validate()` lists every problem at once. Secrets never live
//! here: only paths to files that hold them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod validate;

/// The annotated default configuration, printed by `outpost config print-default`.
pub const DEFAULT_TOML: &str = include_str!("../../config/outpost.toml");

/// Prefix of environment overrides: `OUTPOST_HTTP__LISTEN=127.0.0.1:9000`.
pub const ENV_PREFIX: &str = "OUTPOST_";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// The whole appliance configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub site: SiteConfig,
    pub http: HttpConfig,
    pub mqtt: MqttConfig,
    pub central: CentralConfig,
    pub log: LogConfig,
    pub limits: LimitsConfig,
    pub auth: AuthConfig,
    pub stream: StreamConfig,
    pub tls: TlsConfig,
    pub disk: DiskConfig,
    /// How long a SIGTERM may take: stop accepting, commit what is queued,
    /// answer in-flight requests.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

/// The storage the site log lives on.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiskConfig {
    /// Its rated endurance in terabytes written (an SD card's or SSD's TBW
    /// from its datasheet; 0: unknown). The status page and `/metrics`
    /// project the days left at the present write rate.
    pub endurance_tbw: f64,
}

/// Identity of this site and where it keeps its state.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SiteConfig {
    /// Unique per site; stamped on every event this site originates.
    /// Defaults to the host name.
    pub id: Option<String>,
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Request bodies above this are refused (413) before being read whole.
    pub max_body_bytes: usize,
    /// Time a connection has to send a request's headers (slowloris).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time a request has to send its whole body (408 after it).
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Open HTTP connections (WebSocket sessions excepted). At the limit a
    /// new connection makes room by closing the oldest one that has not
    /// sent a request, else the oldest idle one, else it gets 503.
    pub max_connections: usize,
    /// File holding the token that guards the status page, its JSON, its
    /// event feed and `/metrics`. Unset: those need no token.
    pub status_token_file: Option<PathBuf>,
    /// HTTPS and WSS beside `listen` (certificate from `[tls]`). Unset: none.
    pub tls_listen: Option<SocketAddr>,
    /// Time a TLS connection has to complete its handshake.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
}

/// The server certificate of the TLS listeners (`http.tls_listen`,
/// `mqtt.tls_listen`): PEM files, read at start and on SIGHUP.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// Devices may log in with a client certificate issued by this CA (PEM):
    /// its subject's CN names the device, `<tenant>/<device id>`. Unset: no
    /// client certificates are asked for.
    pub client_ca_file: Option<PathBuf>,
}

/// The MQTT listener for devices (3.1, 3.1.1 and 5.0; also over WebSocket at `/mqtt`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Set `enabled = false` to run without MQTT.
    pub enabled: bool,
    pub listen: SocketAddr,
    /// MQTT over TLS beside `listen` (certificate from `[tls]`). Unset: none.
    pub tls_listen: Option<SocketAddr>,
    /// Connections (TCP and WebSocket) beyond this get CONNACK 0x97 / 0x03.
    pub max_connections: usize,
    /// A device's share of `max_connections` (0: none beyond it).
    pub max_connections_per_device: usize,
    /// A tenant's share of `max_connections` (0: none beyond it).
    pub max_connections_per_tenant: usize,
    /// Largest packet accepted; a larger one closes that connection.
    pub max_packet_size: usize,
    /// Time a new connection has to send its CONNECT.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Publishes of one connection awaiting their commit; at the limit the
    /// connection is not read until one commits.
    pub max_inflight: usize,
    /// Persistent sessions (clean_session = 0) kept per device; one more
    /// evicts the device's oldest.
    pub max_sessions_per_device: usize,
    /// Children a gateway may register by publishing for them (0: only
    /// those registered with `device add --via`).
    pub gateway_max_children: usize,
    /// Persistent sessions kept per tenant (0: none beyond the devices'
    /// own); a CONNECT that would be one more gets CONNACK 0x97.
    pub max_sessions_per_tenant: usize,
    /// Subscription filters one connection may hold; more get SUBACK 0x80.
    pub max_filters: usize,
    /// Retained messages per tenant; beyond this a retained publish is
    /// stored and delivered but not retained.
    pub max_retained_per_tenant: usize,
    /// Bytes of retained payloads per tenant, likewise.
    pub max_retained_bytes_per_tenant: usize,
    /// Longest MQTT 5.0 Session Expiry Interval granted; a longer one (or
    /// "never expires") is lowered to this and told in CONNACK. 3.1.1
    /// persistent sessions expire after it too.
    #[serde(with = "humantime_serde")]
    pub max_session_expiry: Duration,
    /// Longest keep-alive accepted; a client asking for more (or for none)
    /// is told this one (5.0 Server Keep Alive). 0s = no maximum.
    #[serde(with = "humantime_serde")]
    pub max_keep_alive: Duration,
    /// MQTT 5.0 topic aliases a client may set (Topic Alias Maximum).
    pub topic_alias_max: u16,
    /// CONNECTs one device may make per minute; more are refused (5.0:
    /// CONNACK 0x9F, 3.1.1: 0x03) so a device stuck in a reconnect loop
    /// cannot churn the broker. 0 = no limit.
    pub max_connects_per_minute: u32,
    /// Longest topic name or filter, in bytes (publishes, subscriptions,
    /// topic aliases, wills); checked before anything is kept.
    pub max_topic_length: usize,
    /// Deliveries one session may have waiting (while its client reads
    /// slowly, or is away with a persistent session), by count and bytes;
    /// beyond them the oldest are dropped (counted).
    pub max_queued_messages: usize,
    pub max_queued_bytes: usize,
    /// A connection whose client has not taken any of what is written to it
    /// for this long is closed (it stopped reading).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Devices' own topic layouts, mapped to (device, event type): see
    /// `src/mqtt/topic_map.rs` and the README, "Connecting existing devices".
    pub topic_maps: Vec<TopicMapRule>,
}

/// One `[[mqtt.topic_maps]]` entry, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicMapRule {
    /// The device's topic layout, e.g. `"shellies/{device}/{type..}"`.
    #[serde(rename = "match")]
    pub pattern: String,
    /// The event type, for a pattern without `{type}` / `{type..}`.
    #[serde(default)]
    pub event_type: Option<String>,
}

/// The central PostgreSQL the forwarder writes to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CentralConfig {
    /// libpq-style URL of the central PostgreSQL, without a password; unset =
    /// buffer only. The password comes from `password_file` or
    /// `OUTPOST_CENTRAL_PASSWORD`.
    pub url: Option<String>,
    pub password_file: Option<PathBuf>,
    /// `disable`, `prefer` (TLS when the server offers it) or `require`.
    /// When TLS is used the server certificate is always verified.
    pub tls: TlsMode,
    /// PEM file of the CA(s) to trust (default: the system's CA bundle).
    pub ca_file: Option<PathBuf>,
    /// Create / upgrade tenant schemas at startup and on first contact.
    pub migrate: bool,
    /// Tenants to migrate besides those of registered devices.
    pub tenants: Vec<String>,
    /// NOTIFY style installed by migrations: `per_batch` or `per_row`.
    pub notify: NotifyMode,
    /// Forward at most this many rows / bytes per transaction. A batch (and
    /// the next, read ahead) is held in memory while it is sent: more rows
    /// drain a backlog a little faster (5,000: about a tenth) for a higher
    /// peak RSS (3-5 MB at 1,000 MQTT devices).
    pub batch_rows: usize,
    pub batch_bytes: usize,
    /// Let a trickle coalesce this long before forwarding a small batch.
    #[serde(with = "humantime_serde")]
    pub batch_wait: Duration,
    /// When central is slow to commit (busy), a small batch waits longer
    /// than `batch_wait`, never longer than this: fewer, larger
    /// transactions for a central that is falling behind.
    #[serde(with = "humantime_serde")]
    pub max_batch_wait: Duration,
    /// Cap of the exponential retry backoff (starts at 100 ms, with jitter).
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Server-side statement timeout; the client also gives up on a batch
    /// after this plus 5 s, so a silent partition is noticed in seconds.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TCP keepalive idle time (probes follow every second, 3 of them).
    #[serde(with = "humantime_serde")]
    pub keepalive_idle: Duration,
    /// An idle forwarder (and the LISTEN connection) sends `SELECT 1` this
    /// often, so a silent partition shows even when nothing is flowing.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A ping or connect without an answer for this long marks the uplink
    /// down ("no answer from central for …") and reconnects.
    #[serde(with = "humantime_serde")]
    pub answer_timeout: Duration,
    /// Width of the time partitions of every `tenant_<t>.events`:
    /// `"1 month"` or a whole number of days (`"7d"`).
    pub partition_interval: PartitionInterval,
    /// Partitions are made only for events within this far back from now
    /// (and one interval ahead); rows outside go to the default partition,
    /// so no input can make more than a few partitions.
    #[serde(with = "humantime_serde")]
    pub partition_window: Duration,
    /// Detach and drop partitions whose events are all older than this
    /// (whole partitions only); unset keeps everything.
    #[serde(with = "humantime_serde")]
    pub retention: Option<Duration>,
    /// At every (re)connect, the events forwarded within this long before
    /// the newest forwarding are checked against central's `sites.last_seq`
    /// and sent again if central lost them (a failover to an asynchronous
    /// standby). Cover the standby's replication lag; 0 turns it off.
    #[serde(with = "humantime_serde")]
    pub failover_window: Duration,
    /// Where the LISTEN connection (other sites' events) goes, when
    /// `url` is a transaction pooler such as PgBouncer, which cannot carry
    /// LISTEN: PostgreSQL itself. Unset: `url`.
    pub listen_url: Option<String>,
    /// The forwarder keeps its insert prepared on each connection (parsed
    /// and planned once, not per batch: most of central's CPU for small
    /// batches). A transaction pooler before PgBouncer 1.21 cannot carry
    /// prepared statements. Unset: on, unless `listen_url` is set (which
    /// says `url` is such a pooler).
    pub prepared_statements: Option<bool>,
}

impl CentralConfig {
    /// Whether the forwarder prepares its statements (`prepared_statements`).
    pub fn prepares(&self) -> bool {
        self.prepared_statements.unwrap_or(self.listen_url.is_none())
    }
}

/// `central.partition_interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionInterval {
    Month,
    Days(u32),
}

impl PartitionInterval {
    /// As a PostgreSQL interval literal (safe to splice: built from numbers).
    pub fn sql(self) -> String {
        match self {
            PartitionInterval::Month => "'1 month'".into(),
            PartitionInterval::Days(n) => format!("'{n} days'"),
        }
    }

    /// About one interval (a month counts 31 days).
    pub fn approx(self) -> std::time::Duration {
        match self {
            PartitionInterval::Month => std::time::Duration::from_secs(31 * 86_400),
            PartitionInterval::Days(n) => std::time::Duration::from_secs(u64::from(n) * 86_400),
        }
    }

    /// The buckets (see [`bucket`](Self::bucket)) partitions are made for
    /// at `now`: from `window` back to one interval ahead.
    pub fn window(self, now: time::OffsetDateTime, window: std::time::Duration) -> std::ops::RangeInclusive<i64> {
        self.bucket(now - window)..=self.bucket(now + self.approx())
    }

    /// A key naming the partition that holds `at` (equal keys, same partition).
    pub fn bucket(self, at: time::OffsetDateTime) -> i64 {
        let at = at.to_offset(time::UtcOffset::UTC);
        match self {
            PartitionInterval::Month => i64::from(at.year()) * 12 + i64::from(u8::from(at.month())),
            PartitionInterval::Days(n) => at.unix_timestamp().div_euclid(86_400 * i64::from(n)),
        }
    }
}

impl<'de> Deserialize<'de> for PartitionInterval {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for PartitionInterval {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if matches!(t, "1 month" | "1month" | "month" | "1 mon" | "1mon") {
            return Ok(PartitionInterval::Month);
        }
        let bad = || format!("{s:?}: expected \"1 month\" or a whole number of days such as \"7d\"");
        let d = humantime::parse_duration(t).map_err(|_| bad())?;
        let days = d.as_secs() / 86_400;
        if d.subsec_nanos() != 0 || d.as_secs() % 86_400 != 0 || days == 0 || days > 366 {
            return Err(bad());
        }
        Ok(PartitionInterval::Days(days as u32))
    }
}

/// TLS towards the central database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
}

/// Which NOTIFY trigger the central migrations install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyMode {
    /// One notification per inserted row: `{id, device_id, event_type, timestamp}`.
    PerRow,
    /// One notification per insert statement and site: `{site_id, first_seq, last_seq, count}`.
    PerBatch,
}

impl Default for CentralConfig {
    fn default() -> Self {
        Self {
            url: None,
            password_file: None,
            tls: TlsMode::Prefer,
            ca_file: None,
            migrate: true,
            tenants: Vec::new(),
            notify: NotifyMode::PerBatch,
            batch_rows: 1000,
            batch_bytes: 8 * 1024 * 1024,
            batch_wait: Duration::from_millis(100),
            max_batch_wait: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            statement_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            keepalive_idle: Duration::from_secs(4),
            ping_interval: Duration::from_secs(2),
            answer_timeout: Duration::from_secs(5),
            partition_interval: PartitionInterval::Month,
            partition_window: Duration::from_secs(62 * 86_400),
            retention: None,
            failover_window: Duration::from_secs(300),
            listen_url: None,
            prepared_statements: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Byte budget of the site log; at the budget new events are refused (503).
    pub max_bytes: u64,
    /// Share of `max_bytes` other sites' events may take (default: a
    /// quarter). Past it, the oldest of them are evicted: they are in the
    /// central database already. This site's pending events never are.
    pub remote_max_bytes: Option<u64>,
    /// Forwarded rows older than this are pruned. Pending rows never are.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Group commit caps: one transaction takes at most this many rows / bytes.
    pub commit_max_rows: usize,
    pub commit_max_bytes: usize,
    /// Wear-saving mode: how long the writer may hold a group open after its
    /// first request, to gather more into the same commit (0: commit as
    /// soon as the queue is empty). Adds up to this much to every ack.
    #[serde(with = "humantime_serde")]
    pub commit_delay: Duration,
    /// Flash-write budget: bytes per day the site log's writer keeps its
    /// writes within (WAL and checkpoints), by holding groups open longer
    /// (up to `max_commit_delay`) when it writes faster. 0: no budget.
    pub write_budget: u64,
    /// The longest the write budget holds a group open (so the longest it
    /// adds to an ack).
    #[serde(with = "humantime_serde")]
    pub max_commit_delay: Duration,
    /// Capacity of the writer's request queue (requests, not rows). When it is
    /// full, ingest waits for room: the client sees a slower ack, never a drop.
    pub queue_capacity: usize,
    /// Diagnostic output on stderr: `text` lines or `json` objects.
    pub format: LogFormat,
}

/// How diagnostics are written to stderr (see `logging`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message`, fields.
    Json,
}

/// Per-device rate limits (all three windows enforced) and input limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub per_second: u32,
    pub per_minute: u32,
    pub per_hour: u32,
    /// Most events in one batch request.
    pub max_batch: usize,
    /// Largest event payload (serialized JSON object).
    pub max_payload_bytes: usize,
    /// Deepest nesting of a payload.
    pub max_payload_depth: usize,
    /// An event's `timestamp` may be at most this far ahead of its receipt…
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// …and at most this far behind it.
    #[serde(with = "humantime_serde")]
    pub max_event_age: Duration,
    /// Per-tenant overrides of the three windows.
    pub tenants: BTreeMap<String, RateOverride>,
    /// Per-device overrides, keyed `"<tenant>/<device_id>"`.
    pub devices: BTreeMap<String, RateOverride>,
}

/// Overrides of some of the three rate windows.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateOverride {
    pub per_second: Option<u32>,
    pub per_minute: Option<u32>,
    pub per_hour: Option<u32>,
}

/// The three windows in force for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    pub per_second: u32,
    pub per_minute: u32,
    pub per_hour: u32,
}

impl LimitsConfig {
    /// Limits for a device: its own override, else its tenant's, else global.
    pub fn rates_for(&self, tenant: &str, device_id: &str) -> RateLimits {
        let mut r = RateLimits { per_second: self.per_second, per_minute: self.per_minute, per_hour: self.per_hour };
        let mut apply = |o: &RateOverride| {
            r.per_second = o.per_second.unwrap_or(r.per_second);
            r.per_minute = o.per_minute.unwrap_or(r.per_minute);
            r.per_hour = o.per_hour.unwrap_or(r.per_hour);
        };
        if let Some(o) = self.tenants.get(tenant) {
            apply(o);
        }
        // Most sites override no device: no key to build for every check.
        if !self.devices.is_empty()
            && let Some(o) = self.devices.get(&format!("{tenant}/{device_id}"))
        {
            apply(o);
        }
        r
    }
}

/// Live subscribers (WebSocket, SSE, long-poll).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// Undelivered events a subscriber may hold; beyond it the subscriber is
    /// closed with its last seq (it resumes from there). Ingest never waits.
    pub queue: usize,
    /// Subscribers beyond this are refused (503).
    pub max_subscribers: usize,
    /// A device's share of them, and a tenant's (0: none beyond the
    /// global cap); over one: 429 naming it.
    pub max_subscribers_per_device: usize,
    pub max_subscribers_per_tenant: usize,
    /// Status-page feeds (`/api/v1/status/events`): a pool of their own.
    pub max_status_subscribers: usize,
    /// Idle WebSockets are pinged this often; silent for two of these: closed.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// SSE heartbeat comment interval.
    #[serde(with = "humantime_serde")]
    pub sse_heartbeat: Duration,
    /// The browser origin (or `*`) allowed to call the API cross-origin (unset: none).
    pub cors_origin: Option<String>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            queue: 1024,
            max_subscribers: 1000,
            max_subscribers_per_device: 16,
            max_subscribers_per_tenant: 0,
            max_status_subscribers: 16,
            ping_interval: Duration::from_secs(30),
            sse_heartbeat: Duration::from_secs(15),
            cors_origin: None,
        }
    }
}

/// Token verification: the algorithm is pinned, never taken from the token.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub algorithm: Algorithm,
    /// HS256 secret; generated (mode 0600) at first start when missing.
    /// Default: `<data_dir>/jwt.secret`.
    pub secret_file: Option<PathBuf>,
    /// EdDSA / ES256: PEM public key used to verify tokens.
    pub public_key_file: Option<PathBuf>,
    /// EdDSA / ES256: PEM private key, needed only to issue tokens here.
    pub private_key_file: Option<PathBuf>,
    /// Lifetime of tokens issued without an explicit `--ttl`.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Clock skew tolerated on `exp`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

/// Supported token signature algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Algorithm {
    HS256,
    EdDSA,
    ES256,
}

impl Default for SiteConfig {
    fn default() -> Self {
        Self { id: None, data_dir: PathBuf::from("./data") }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            max_body_bytes: 4 * 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
            status_token_file: None,
            tls_listen: None,
            tls_handshake_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            tls_listen: None,
            max_connections: 1000,
            max_connections_per_device: 16,
            max_connections_per_tenant: 0,
            max_packet_size: 128 * 1024,
            connect_timeout: Duration::from_secs(10),
            max_inflight: 256,
            max_sessions_per_device: 4,
            gateway_max_children: 256,
            max_sessions_per_tenant: 0,
            max_filters: 32,
            max_retained_per_tenant: 1000,
            max_retained_bytes_per_tenant: 4 * 1024 * 1024,
            max_session_expiry: Duration::from_secs(24 * 3600),
            max_keep_alive: Duration::from_secs(3600),
            topic_alias_max: 32,
            max_connects_per_minute: 120,
            max_topic_length: 512,
            max_queued_messages: 1000,
            max_queued_bytes: 256 * 1024,
            write_timeout: Duration::from_secs(30),
            topic_maps: Vec::new(),
        }
    }
}

impl LogConfig {
    /// Bytes other sites' events may take: `remote_max_bytes`, else a quarter
    /// of `max_bytes`.
    pub fn remote_budget(&self) -> u64 {
        self.remote_max_bytes.unwrap_or(self.max_bytes / 4)
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            max_bytes: 8 * 1024 * 1024 * 1024,
            remote_max_bytes: None,
            retention: Duration::from_secs(7 * 24 * 3600),
            commit_max_rows: 2000,
            commit_max_bytes: 8 * 1024 * 1024,
            commit_delay: Duration::ZERO,
            write_budget: 0,
            max_commit_delay: Duration::from_millis(500),
            queue_capacity: 4096,
            format: LogFormat::Text,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            per_second: 10,
            per_minute: 500,
            per_hour: 10_000,
            max_batch: 1000,
            max_payload_bytes: 64 * 1024,
            max_payload_depth: 32,
            max_future_skew: Duration::from_secs(3600),
            max_event_age: Duration::from_secs(30 * 86_400),
            tenants: BTreeMap::new(),
            devices: BTreeMap::new(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::HS256,
            secret_file: None,
            public_key_file: None,
            private_key_file: None,
            token_ttl: Duration::from_secs(30 * 24 * 3600),
            leeway: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Reads `path` (if any), applies `OUTPOST_*` overrides from `env`, validates.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, Error> {
        let (text, name) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| Error::Read { path: p.to_path_buf(), source })?,
                p.display().to_string(),
            ),
            None => (String::new(), "<defaults>".to_string()),
        };
        Self::parse(&text, name, env)
    }

    /// [`Config::load`] on TOML text instead of a file (errors name the
    /// source `<string>`): parse, apply `OUTPOST_*` overrides, validate.
    pub fn from_toml_str(text: &str, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, Error> {
        Self::parse(text, "<string>".to_string(), env)
    }

    fn parse(text: &str, name: String, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, Error> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| Error::Parse { path: name.clone(), message: e.to_string() })?;
        apply_env(&mut table, env)?;
        let config: Config = Config::deserialize(toml::Value::Table(table))
            .map_err(|e| Error::Parse { path: name, message: e.to_string() })?;
        config.validate().map_err(Error::Invalid)?;
        Ok(config)
    }

    /// Whether a TLS listener is configured (`http.tls_listen`, or
    /// `mqtt.tls_listen` with MQTT enabled): then `[tls]` must name the
    /// certificate, and the start and the doctor load it.
    pub fn tls_listeners(&self) -> bool {
        self.http.tls_listen.is_some() || (self.mqtt.enabled && self.mqtt.tls_listen.is_some())
    }

    /// The site id in force: configured, else the host name.
    pub fn site_id(&self) -> String {
        if let Some(id) = &self.site.id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            .take(64)
            .collect();
        if host.is_empty() { "outpost".into() } else { host }
    }

    /// Path of the SQLite site log.
    pub fn log_path(&self) -> PathBuf {
        self.site.data_dir.join("site-log.sqlite")
    }

    /// Path of the HS256 secret.
    pub fn secret_path(&self) -> PathBuf {
        self.auth.secret_file.clone().unwrap_or_else(|| self.site.data_dir.join("jwt.secret"))
    }

    /// Creates the data dir (and missing parents) readable by its owner
    /// only, the mode `outpost doctor` asks for: it holds the site log and
    /// the signing secret. An existing directory keeps its mode.
    pub fn create_data_dir(&self) -> std::io::Result<()> {
        create_private_dir(&self.site.data_dir)
    }
}

/// `mkdir -p -m 0700`: directories this call creates are private to their
/// owner (whatever the umask allows beyond that is not granted).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

impl Default for Config {
    fn default() -> Self {
        Self {
            site: SiteConfig::default(),
            http: HttpConfig::default(),
            mqtt: MqttConfig::default(),
            central: CentralConfig::default(),
            log: LogConfig::default(),
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            stream: StreamConfig::default(),
            tls: TlsConfig::default(),
            disk: DiskConfig::default(),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Where the password of a `scheme://user:password@host/…` URL sits, as a
/// byte range of `url`; `None` when it carries none.
pub fn url_password(url: &str) -> Option<std::ops::Range<usize>> {
    let start = url.find("://")? + 3;
    let authority_len = url[start..].find(['/', '?']).unwrap_or(url.len() - start);
    let creds_len = url[start..start + authority_len].rfind('@')?;
    let colon = url[start..start + creds_len].find(':')?;
    Some(start + colon + 1..start + creds_len)
}

/// A URL with any password replaced, for printing.
pub fn redact_url(url: &str) -> String {
    match url_password(url) {
        Some(r) => format!("{}***{}", &url[..r.start], &url[r.end..]),
        None => url.to_string(),
    }
}

/// True when a postgres URL carries `user:password@`.
fn url_has_password(url: &str) -> bool {
    url_password(url).is_some()
}

fn valid_site_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Overlays `OUTPOST_<SECTION>__<KEY>[__<KEY>…]` variables onto the TOML table.
/// A value is read as a TOML value when it parses as one (`8080`, `true`),
/// otherwise as a string (`127.0.0.1:9000`, `30d`). Variables without `__`
/// (e.g. `OUTPOST_CENTRAL_PASSWORD`, `OUTPOST_LOG`) are not config keys.
fn apply_env(table: &mut toml::Table, env: impl IntoIterator<Item = (String, String)>) -> Result<(), Error> {
    let mut vars: Vec<(String, String)> =
        env.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__")).collect();
    vars.sort();
    for (var, raw) in vars {
        let path: Vec<String> = var[ENV_PREFIX.len()..].split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(Error::Env { var, message: "empty key segment".into() });
        }
        let value = parse_env_value(&raw);
        let mut cursor = &mut *table;
        for seg in &path[..path.len() - 1] {
            let entry = cursor.entry(seg.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(Error::Env { var, message: format!("`{seg}` is not a section") });
                }
            };
        }
        if let Some(last) = path.last() {
            cursor.insert(last.clone(), value);
        }
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn partition_interval_is_a_month_or_whole_days() {
        let parse = |v: &str| Config::from_toml_str(&format!("[central]\npartition_interval = {v:?}\n"), Vec::new());
        assert_eq!(parse("1 month").unwrap().central.partition_interval, PartitionInterval::Month);
        assert_eq!(parse("7d").unwrap().central.partition_interval, PartitionInterval::Days(7));
        assert_eq!(parse("48h").unwrap().central.partition_interval, PartitionInterval::Days(2));
        for bad in ["36h", "0d", "2 months", "soon"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("partition_interval") && e.contains("whole number of days"), "{bad}: {e}");
        }
        let retention = Config::from_toml_str("[central]\nretention = \"400d\"\n", Vec::new()).unwrap();
        assert_eq!(retention.central.retention, Some(Duration::from_secs(400 * 86_400)));
        assert_eq!(Config::default().central.retention, None);
        let t = time::macros::datetime!(2026-11-29 23:59 UTC);
        assert_eq!(
            PartitionInterval::Month.bucket(t),
            PartitionInterval::Month.bucket(time::macros::datetime!(2026-11-01 0:00 UTC))
        );
        assert_ne!(
            PartitionInterval::Month.bucket(t),
            PartitionInterval::Month.bucket(time::macros::datetime!(2026-12-01 0:00 UTC))
        );
    }

    #[test]
    fn load_and_from_toml_str_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outpost.toml");
        let overlay = env(&[("OUTPOST_HTTP__MAX_BODY_BYTES", "2000000"), ("OUTPOST_SITE__ID", "s1")]);
        for text in [DEFAULT_TOML, "", "[limits]\nper_second = 7\n"] {
            std::fs::write(&path, text).unwrap();
            let from_file = Config::load(Some(&path), overlay.clone()).unwrap();
            let from_str = Config::from_toml_str(text, overlay.clone()).unwrap();
            assert_eq!(from_file, from_str, "{text:?}");
        }
        for text in ["[limits]\nmax_batch = 0\n", "not toml =", "[nope]\n"] {
            std::fs::write(&path, text).unwrap();
            let from_file = Config::load(Some(&path), Vec::new()).unwrap_err().to_string();
            let from_str = Config::from_toml_str(text, Vec::new()).unwrap_err().to_string();
            let name = path.display().to_string();
            assert_eq!(from_file.replace(&name, "<string>"), from_str, "{text:?}");
        }
    }

    #[test]
    fn a_topic_map_that_would_let_a_device_publish_as_another_is_refused_by_name() {
        let text = "[[mqtt.topic_maps]]\nmatch = \"tele/{device}/{type}\"\n[[mqtt.topic_maps]]\nmatch = \"zigbee2mqtt/{type}\"\n";
        let err = Config::from_toml_str(text, Vec::new()).unwrap_err().to_string();
        assert!(
            err.contains("mqtt.topic_maps[1] (match = \"zigbee2mqtt/{type}\"): needs {device} exactly once"),
            "{err}"
        );
        let ok = Config::from_toml_str(
            "[[mqtt.topic_maps]]\nmatch = \"stat/{device}/+\"\nevent_type = \"status\"\n",
            Vec::new(),
        );
        assert_eq!(ok.unwrap().mqtt.topic_maps.len(), 1);
    }

    #[test]
    fn central_batch_wait_bounds_and_prepared_statements_follow_the_pooler_hint() {
        let mut c = Config::default();
        c.central.url = Some("postgres://outpost@db:5432/fleet".into());
        assert!(c.validate().is_ok());
        assert!(c.central.prepares(), "PostgreSQL itself: prepared");
        c.central.listen_url = Some("postgres://outpost@db:5432/fleet".into());
        assert!(!c.central.prepares(), "listen_url says url is a transaction pooler: unnamed statements");
        c.central.prepared_statements = Some(true);
        assert!(c.central.prepares(), "PgBouncer 1.21+ with max_prepared_statements: on when asked");
        c.central.listen_url = None;
        c.central.prepared_statements = Some(false);
        assert!(!c.central.prepares());
        c.central.max_batch_wait = Duration::from_millis(50);
        let problems = c.validate().unwrap_err();
        assert!(
            problems.iter().any(|p| p.starts_with("central.max_batch_wait = 50ms: below central.batch_wait = 100ms")),
            "{problems:?}"
        );
        let c = Config::from_toml_str("[central]\nmax_batch_wait = \"2s\"\nprepared_statements = false\n", Vec::new())
            .unwrap();
        assert_eq!(c.central.max_batch_wait, Duration::from_secs(2));
        assert_eq!(c.central.prepared_statements, Some(false));
    }

    #[test]
    fn a_write_budget_is_checked_against_its_holds_and_a_rating_must_be_a_number_of_terabytes() {
        let mut c = Config::default();
        c.log.write_budget = 20_000_000_000;
        c.log.commit_delay = Duration::from_millis(100);
        c.log.max_commit_delay = Duration::from_millis(50);
        let problems = c.validate().unwrap_err();
        assert!(
            problems.iter().any(|p| p.starts_with("log.max_commit_delay = 50ms: below log.commit_delay")),
            "{problems:?}"
        );
        c.log.max_commit_delay = Duration::from_secs(2);
        c.disk.endurance_tbw = -1.0;
        let problems = c.validate().unwrap_err();
        assert!(problems.iter().any(|p| p.starts_with("log.max_commit_delay = 2s: at most 1s")), "{problems:?}");
        assert!(problems.iter().any(|p| p.starts_with("disk.endurance_tbw = -1")), "{problems:?}");
        c.log.max_commit_delay = Duration::from_secs(1);
        c.disk.endurance_tbw = 30.0;
        c.validate().unwrap();
    }

    #[test]
    fn annotated_default_file_parses_to_the_defaults() {
        let parsed: Config = toml::from_str(DEFAULT_TOML).expect("default config parses");
        assert_eq!(parsed, Config::default());
        parsed.validate().expect("defaults are valid");
    }

    #[test]
    fn env_overrides_reach_nested_keys_with_typed_values() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::load(
            None,
            env(&[
                ("OUTPOST_HTTP__LISTEN", "127.0.0.1:9000"),
                ("OUTPOST_LIMITS__PER_SECOND", "99"),
                ("OUTPOST_LOG__RETENTION", "2d"),
                ("OUTPOST_SITE__DATA_DIR", dir.path().to_str().unwrap()),
                ("OUTPOST_CENTRAL_PASSWORD", "not-a-key"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.http.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(cfg.limits.per_second, 99);
        assert_eq!(cfg.log.retention, Duration::from_secs(2 * 86400));
        let cfg = Config::load(None, env(&[("OUTPOST_LOG__FORMAT", "json")])).unwrap();
        assert_eq!(cfg.log.format, LogFormat::Json);
        let err = Config::load(None, env(&[("OUTPOST_LOG__FORMAT", "xml")])).unwrap_err().to_string();
        assert!(err.contains("xml"), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors_from_file_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[http]\nlisten = \"0.0.0.0:1\"\nlistn = 3\n").unwrap();
        let err = Config::load(Some(&f), env(&[])).unwrap_err().to_string();
        assert!(err.contains("listn"), "{err}");
        let err = Config::load(None, env(&[("OUTPOST_HTTP__NOPE", "1")])).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn validate_lists_every_problem() {
        let mut c = Config::default();
        c.limits.per_second = 0;
        c.limits.max_batch = 0;
        c.log.max_bytes = 10;
        c.site.id = Some("bad id!".into());
        let problems = c.validate().unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    #[test]
    fn tls_listeners_and_certificate_files_come_together() {
        let mut c = Config::default();
        c.http.tls_listen = Some("127.0.0.1:8443".parse().unwrap());
        let problems = c.validate().unwrap_err();
        assert!(problems[0].contains("tls.cert_file and tls.key_file"), "{problems:?}");
        c.tls.cert_file = Some("/etc/outpost/tls/cert.pem".into());
        c.tls.key_file = Some("/etc/outpost/tls/key.pem".into());
        c.validate().unwrap();
        c.http.tls_listen = None;
        let problems = c.validate().unwrap_err();
        assert!(problems[0].contains("no TLS listener"), "{problems:?}");
    }

    #[test]
    fn central_url_with_a_password_is_refused() {
        let mut c = Config::default();
        c.central.url = Some("postgres://u:secret@db:5432/x".into());
        let problems = c.validate().unwrap_err();
        assert!(problems[0].contains("password"), "{problems:?}");
        assert!(!problems[0].contains("secret"), "the secret itself is not echoed");
        c.central.url = Some("postgres://u@db:5432/x?application_name=a:b".into());
        c.validate().unwrap();
    }

    #[test]
    fn rate_overrides_apply_device_over_tenant_over_global() {
        let mut l = LimitsConfig::default();
        l.tenants.insert("acme".into(), RateOverride { per_second: Some(50), ..Default::default() });
        l.devices.insert("acme/d1".into(), RateOverride { per_minute: Some(7), ..Default::default() });
        let r = l.rates_for("acme", "d1");
        assert_eq!((r.per_second, r.per_minute, r.per_hour), (50, 7, 10_000));
        let r = l.rates_for("globex", "d1");
        assert_eq!((r.per_second, r.per_minute, r.per_hour), (10, 500, 10_000));
    }
}
