//! The one place that starts stages, wires their channels and orders shutdown.
//!
//! Start: data dir → site log (migrations) → registry → keys → MQTT router →
//! writer thread (observed by the stream hub and the MQTT bridge) → bind
//! sockets → stages on one `TaskTracker` → `READY=1`.
//! Stop (token cancelled): listeners stop accepting, in-flight requests finish
//! (their appends commit), WebSocket/SSE sessions close, stages end, the last
//! `LogHandle` drops, the writer drains its queue and exits. Bounded by
//! `shutdown_grace`. A stage that fails or panics stops everything the same
//! way, and the process exits non-zero so systemd restarts it: nothing runs
//! on half its stages.

use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiState};
use crate::auth::{self, Authenticator, Registry};
use crate::central::Connector;
use crate::config::Config;
use crate::event::InputLimits;
use crate::forward::{ForwardStatus, Forwarder, Uplink};
use crate::http::{self, BodyLimit};
use crate::ingest::IngestHandle;
use crate::ingest::http::IngestState;
use crate::limits::Limiter;
use crate::log::{self, CommitObserver, LogHandle, Readers, WriterConfig};
use crate::metrics::Metrics;
use crate::mqtt::{self, MqttDeps};
use crate::stream::Hub;
use crate::stream::StreamState;
use crate::stream::listen::Listener;
pub use crate::stream::{FedEvent, Feed};
use crate::systemd;

/// A started appliance.
pub struct Running {
    /// Where HTTP listens (the real port when configured with port 0).
    pub http_addr: SocketAddr,
    /// Where MQTT listens, when enabled.
    pub mqtt_addr: Option<SocketAddr>,
    /// Where HTTPS listens, when `http.tls_listen` is set.
    pub https_addr: Option<SocketAddr>,
    /// Where MQTT over TLS listens, when `mqtt.tls_listen` is set.
    pub mqtts_addr: Option<SocketAddr>,
    /// Cancel to stop the appliance.
    pub shutdown: CancellationToken,
    supervisor: JoinHandle<anyhow::Result<()>>,
    mqtt: Option<MqttDeps>,
    log: LogHandle,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
}

impl Running {
    /// Waits until the appliance has stopped (after `shutdown` or a stage failure).
    pub async fn wait(self) -> anyhow::Result<()> {
        // The MQTT handles and the log handle hold the log writer's queue
        // open: dropped first, or the writer would wait out the shutdown
        // grace for them.
        let Running { supervisor, mqtt, log, hub, metrics, .. } = self;
        drop((mqtt, log, hub, metrics));
        supervisor.await.context("appliance supervisor panicked")?
    }

    /// Stops the appliance and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// The site log's writer, for in-process drivers (the fleet bench) that
    /// append without a listener in between.
    pub fn log(&self) -> &LogHandle {
        &self.log
    }

    /// A live feed of what the site log commits for `tenant`, local and
    /// remote, as a WebSocket subscriber would see it.
    pub fn feed(&self, tenant: &str) -> Feed {
        Feed::new(&self.hub, tenant)
    }

    /// The counters `/metrics` shows.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Serves one MQTT connection over any byte stream, as the listener
    /// serves a TCP one (same session code, slot and limits), until the
    /// peer or the server closes it. For harnesses that skip the socket,
    /// such as the `mqtt_session` fuzz target. `None` when MQTT is
    /// disabled or at `mqtt.max_connections`.
    pub async fn serve_mqtt<S>(&self, stream: S) -> Option<()>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Sync + Unpin + 'static,
    {
        mqtt::serve_stream(self.mqtt.as_ref()?, stream, self.shutdown.clone()).await
    }
}

/// Runs the appliance until SIGTERM / SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM right after the "listening" line must drain,
    // not kill.
    let signals = signals().context("cannot install signal handlers")?;
    let running = start(config).await?;
    systemd::ready();
    let shutdown = running.shutdown.clone();
    tokio::spawn(async move {
        let (mut term, mut int) = signals;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown requested; finishing in-flight requests");
        systemd::stopping();
        shutdown.cancel();
    });
    running.wait().await
}

fn signals() -> std::io::Result<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)> {
    use tokio::signal::unix::{SignalKind, signal};
    Ok((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?))
}

/// Starts every stage and returns once the sockets are bound.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let mut site = open_site(&config).await?;
    let metrics = Arc::new(Metrics::new());
    // Configuration errors of the uplink stop the start, with the reason.
    let connector = config
        .central
        .url
        .as_ref()
        .map(|_| Connector::new(&config.central).context("central database settings"))
        .transpose()?;
    // LISTEN needs PostgreSQL itself when `url` is a transaction pooler.
    let listen_connector = match &config.central.listen_url {
        Some(url) => Some(
            Connector::new(&crate::config::CentralConfig { url: Some(url.clone()), ..config.central.clone() })
                .context("central.listen_url")?,
        ),
        None => connector.clone(),
    };
    let uplink = Arc::new(ForwardStatus::with_answer_timeout(
        if connector.is_some() { Uplink::Connecting } else { Uplink::Disabled },
        config.central.answer_timeout,
    ));
    let shares = crate::stream::Shares {
        per_device: config.stream.max_subscribers_per_device,
        per_tenant: config.stream.max_subscribers_per_tenant,
        status_page: config.stream.max_status_subscribers,
    };
    let hub = Hub::new(config.stream.queue, config.stream.max_subscribers, shares, metrics.clone());
    let broker = config.mqtt.enabled.then(|| start_broker(&config, &hub, &metrics)).transpose()?;
    let mut observers: Vec<Arc<dyn CommitObserver>> = vec![hub.clone()];
    if let Some(b) = &broker {
        observers.push(b.feed.clone());
    }
    let committed = Arc::new(Notify::new());
    let (log, writer) =
        log::writer::spawn(site.conn, writer_config(&config), metrics.clone(), committed.clone(), observers)?;
    let ingest = IngestHandle::new(
        log.clone(),
        Limiter::new(config.limits.clone()),
        metrics.clone(),
        config.site_id(),
        InputLimits {
            max_payload_bytes: config.limits.max_payload_bytes,
            max_payload_depth: config.limits.max_payload_depth,
            max_future_skew: config.limits.max_future_skew,
            max_event_age: config.limits.max_event_age,
        },
        config.limits.max_batch,
    );
    let certs =
        config.tls_listeners().then(|| crate::tls::Certs::load(&config.tls)).transpose().map_err(anyhow::Error::msg)?;
    let Listeners { http: http_listener, mqtt: mqtt_listener, https: https_listener, mqtts: mqtts_listener } =
        bind(&config).await?;
    let http_addr = http_listener.local_addr()?;
    let mqtt_addr = mqtt_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let https_addr = https_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let mqtts_addr = mqtts_listener.as_ref().map(TcpListener::local_addr).transpose()?;

    let status_token = config.http.status_token().map_err(anyhow::Error::msg)?;
    let stages = Stages::new();
    let mqtt_deps = match broker {
        Some(b) => {
            let retained = site.readers.with(crate::log::mqtt::retained).await?;
            if !retained.is_empty() {
                let n = mqtt::restore_retained(b.sessions.fanout(), retained);
                tracing::info!(messages = n, "mqtt retained messages restored from the site log");
            }
            let s = stages.shutdown.clone();
            stages.spawn("mqtt-fanout", async move {
                tokio::select! {
                    () = b.fanout_task => {}
                    () = s.cancelled() => {}
                }
                Ok::<(), anyhow::Error>(())
            });
            let deps = MqttDeps {
                ingest: ingest.clone(),
                auth: site.auth.clone(),
                metrics: metrics.clone(),
                config: config.mqtt.clone(),
                topics: b.sessions.fanout().topics().clone(),
                sessions: b.sessions,
                connections: Default::default(),
                tasks: stages.tracker.clone(),
            };
            let stored = std::mem::take(&mut site.mqtt_sessions);
            mqtt::resume_stored_sessions(&deps, stored, &stages.shutdown).await?;
            Some(deps)
        }
        None => None,
    };
    let usage = tenant_usage(&hub, mqtt_deps.as_ref().map(|d| d.sessions.clone()));
    let mut router = routes(
        &config,
        &site.auth,
        &ingest,
        &hub,
        &log,
        &site.readers,
        &metrics,
        &uplink,
        &stages,
        status_token,
        usage,
    );
    if let Some(deps) = &mqtt_deps {
        router = router.merge(mqtt::ws::routes(deps.clone(), stages.tracker.clone(), stages.shutdown.clone()));
    }
    let router = http::finish(router, config.stream.cors_origin.as_deref());
    let s = stages.shutdown.clone();
    let limits = http::Limits {
        tls_handshake_timeout: config.http.tls_handshake_timeout,
        header_timeout: config.http.header_timeout,
        body_timeout: config.http.body_timeout,
        max_connections: config.http.max_connections,
    };
    if let (Some(listener), Some(certs)) = (https_listener, &certs) {
        let acceptor = tokio_rustls::TlsAcceptor::from(certs.server_config(&[b"http/1.1"]));
        let s = stages.shutdown.clone();
        stages.spawn("https", http::serve(listener, router.clone(), s, limits, Some(acceptor)));
    }
    stages.spawn("http", http::serve(http_listener, router, s, limits, None));
    let (r, s) = (site.readers.clone(), stages.shutdown.clone());
    stages.spawn("registry", auth::run_registry_refresh(r, site.registry, s));
    if let (Some(listener), Some(deps), Some(certs)) = (mqtts_listener, &mqtt_deps, &certs) {
        let acceptor = tokio_rustls::TlsAcceptor::from(certs.server_config(&[b"mqtt"]));
        let (deps, t, s) = (deps.clone(), stages.tracker.clone(), stages.shutdown.clone());
        stages.spawn("mqtts", async move {
            mqtt::run(listener, deps, t, s, Some(acceptor)).await;
            Ok::<_, std::convert::Infallible>(())
        });
    }
    if let (Some(listener), Some(deps)) = (mqtt_listener, mqtt_deps.clone()) {
        let (t, s) = (stages.tracker.clone(), stages.shutdown.clone());
        stages.spawn("mqtt", async move {
            mqtt::run(listener, deps, t, s, None).await;
            Ok::<_, std::convert::Infallible>(())
        });
    }
    let hup = crate::tls::sighup().context("cannot install the SIGHUP handler")?;
    stages.spawn("reload", crate::tls::reload_on_sighup(hup, certs, stages.shutdown.clone()));
    match connector {
        Some(connector) => {
            let central = Central {
                listen: listen_connector.unwrap_or_else(|| connector.clone()),
                connector,
                uplink,
                committed,
                log: log.clone(),
                readers: site.readers.clone(),
                interest: hub.interest.clone(),
            };
            spawn_central(&stages, &config, central, metrics.clone());
        }
        None => tracing::info!("central.url not set: buffering locally, nothing is forwarded"),
    }
    stages.spawn("retention", log::retention::run(log.clone(), config.log.retention, stages.shutdown.clone()));
    stages.spawn("device-counters", log::writer::flush_devices(log.clone(), stages.shutdown.clone()));
    stages.spawn("watchdog", systemd::run_watchdog(log.clone(), stages.shutdown.clone()));
    stages.spawn("site-log", watch_writer(log.clone(), stages.shutdown.clone()));
    stages.tracker.close();

    let also = |name: &str, a: Option<SocketAddr>| a.map_or(String::new(), |a| format!(", {name} listening on {a}"));
    tracing::info!(site_id = config.site_id(), %http_addr, data_dir = %config.site.data_dir.display(),
        "outpost running; http listening on {http_addr}{}{}{}",
        also("https", https_addr), also("mqtt", mqtt_addr), also("mqtts", mqtts_addr));
    let shutdown = stages.shutdown.clone();
    let supervisor = tokio::spawn(stages.supervise(writer, config.shutdown_grace));
    Ok(Running {
        http_addr,
        mqtt_addr,
        https_addr,
        mqtts_addr,
        shutdown,
        supervisor,
        mqtt: mqtt_deps,
        log,
        hub,
        metrics,
    })
}

/// What the stages that talk to the central database share.
struct Central {
    connector: Connector,
    /// Where LISTEN connects (`central.listen_url`, else `connector`).
    listen: Connector,
    uplink: Arc<ForwardStatus>,
    committed: Arc<Notify>,
    log: LogHandle,
    readers: Readers,
    interest: Arc<crate::stream::interest::Interest>,
}

/// The LISTEN connection (other sites' events) and the forwarder.
fn spawn_central(stages: &Stages, config: &Config, c: Central, metrics: Arc<Metrics>) {
    let listener = Listener {
        connector: c.listen,
        config: config.central.clone(),
        site_id: config.site_id(),
        log: c.log.clone(),
        readers: c.readers.clone(),
        metrics: metrics.clone(),
        interest: c.interest.clone(),
    };
    stages.spawn("listen", listener.run(stages.shutdown.clone()));
    let forwarder = Forwarder {
        connector: c.connector,
        config: config.central.clone(),
        log: c.log,
        readers: c.readers,
        status: c.uplink,
        metrics,
        wake: c.committed,
        site_id: config.site_id().to_string(),
    };
    stages.spawn("forwarder", forwarder.run(stages.shutdown.clone()));
}

/// What the site's own files give: the migrated log, readers, the device
/// registry and the token keys.
struct Site {
    conn: rusqlite::Connection,
    /// MQTT sessions still waiting for their clients (see `log::mqtt`).
    mqtt_sessions: Vec<crate::log::mqtt::StoredSession>,
    readers: Readers,
    registry: Arc<Registry>,
    auth: Arc<Authenticator>,
}

async fn open_site(config: &Config) -> anyhow::Result<Site> {
    let data_dir = &config.site.data_dir;
    config.create_data_dir().with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let log_path = config.log_path();
    let conn = {
        let p = log_path.clone();
        tokio::task::spawn_blocking(move || log::open_and_migrate(&p))
            .await
            .context("migration task panicked")?
            .with_context(|| format!("cannot open site log {}", log_path.display()))?
    };
    let max_expiry = config.mqtt.max_session_expiry.as_secs().min(u64::from(u32::MAX - 1)) as u32;
    let mqtt_sessions = crate::log::mqtt::start_sessions(&conn, crate::event::now_us(), max_expiry)
        .context("cannot read the MQTT sessions kept in the site log")?;
    let readers = Readers::new(log_path.clone());
    let registry = Arc::new(Registry::for_log(log_path));
    let reg = registry.clone();
    readers.with(move |c| reg.refresh(c)).await.context("cannot load device registry")?;
    let (auth, created) = Authenticator::from_config(config, registry.clone()).context("cannot load token keys")?;
    if created {
        tracing::info!(
            secret = %config.secret_path().display(),
            "first start: created the token signing secret. Register a device and get its token with: \
             outpost device add --tenant <tenant> --id <device-id>   (admin token: outpost token issue --admin)"
        );
    }
    Ok(Site { conn, mqtt_sessions, readers, registry, auth: Arc::new(auth) })
}

fn writer_config(config: &Config) -> WriterConfig {
    WriterConfig {
        max_bytes: config.log.max_bytes,
        remote_max_bytes: config.log.remote_budget(),
        site_id: config.site_id().to_string(),
        commit_max_rows: config.log.commit_max_rows,
        commit_delay: config.log.commit_delay,
        commit_max_bytes: config.log.commit_max_bytes,
        queue_capacity: config.log.queue_capacity,
        write_budget: config.log.write_budget,
        max_commit_delay: config.log.max_commit_delay,
    }
}

/// The MQTT fan-out, the feed of committed events into it (and its task),
/// and the sessions.
struct Broker {
    sessions: Arc<mqtt::state::Sessions>,
    feed: Arc<mqtt::fanout::Feed>,
    fanout_task: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
}

fn start_broker(config: &Config, hub: &Hub, metrics: &Arc<Metrics>) -> anyhow::Result<Broker> {
    let topics = mqtt::topic_map::TopicMaps::new(&config.mqtt.topic_maps).map_err(|e| anyhow::anyhow!(e.join("; ")))?;
    let fanout =
        Arc::new(mqtt::fanout::Fanout::new(&config.mqtt, Arc::new(topics), hub.interest.clone(), metrics.clone()));
    let (feed, task) = mqtt::fanout::Feed::new(fanout.clone(), metrics.clone());
    let sessions = Arc::new(mqtt::state::Sessions::new(&config.mqtt, fanout));
    Ok(Broker { sessions, feed, fanout_task: Box::pin(task) })
}

/// The bound sockets; the TLS ones only when configured.
struct Listeners {
    http: TcpListener,
    mqtt: Option<TcpListener>,
    https: Option<TcpListener>,
    mqtts: Option<TcpListener>,
}

async fn bind(config: &Config) -> anyhow::Result<Listeners> {
    async fn listen(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
        TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {key} = {addr}"))
    }
    let mqtt = config.mqtt.enabled;
    Ok(Listeners {
        mqtt: if mqtt { Some(listen(config.mqtt.listen, "mqtt.listen").await?) } else { None },
        mqtts: match config.mqtt.tls_listen {
            Some(a) if mqtt => Some(listen(a, "mqtt.tls_listen").await?),
            _ => None,
        },
        https: match config.http.tls_listen {
            Some(a) => Some(listen(a, "http.tls_listen").await?),
            None => None,
        },
        http: listen(config.http.listen, "http.listen").await?,
    })
}

/// Every stage's routes, merged (the caller adds `/mqtt`, then `http::finish`).
#[allow(clippy::too_many_arguments)]
fn routes(
    config: &Config,
    auth: &Arc<Authenticator>,
    ingest: &IngestHandle,
    hub: &Arc<Hub>,
    log: &LogHandle,
    readers: &Readers,
    metrics: &Arc<Metrics>,
    uplink: &Arc<ForwardStatus>,
    stages: &Stages,
    status_token: Option<String>,
    tenant_usage: api::status::TenantUsage,
) -> axum::Router {
    let ingest_routes = crate::ingest::http::routes(IngestState {
        ingest: ingest.clone(),
        auth: auth.clone(),
        max_body: BodyLimit(config.http.max_body_bytes),
    });
    let stream_routes = crate::stream::http::routes(StreamState {
        hub: hub.clone(),
        auth: auth.clone(),
        readers: readers.clone(),
        metrics: metrics.clone(),
        config: config.stream.clone(),
        events: Arc::new(ingest.clone()),
        shutdown: stages.shutdown.clone(),
        tracker: stages.tracker.clone(),
        max_message: config.limits.max_payload_bytes + crate::stream::WS_ENVELOPE,
    });
    let api_routes = api::routes(ApiState {
        auth: auth.clone(),
        log: log.clone(),
        readers: readers.clone(),
        metrics: metrics.clone(),
        uplink: uplink.clone(),
        limits: Arc::new(config.limits.clone()),
        site_id: config.site_id().into(),
        max_body: config.http.max_body_bytes,
        started: Instant::now(),
        status_cache: Default::default(),
        sampler: Arc::new(std::sync::Mutex::new(api::sampler::Sampler::new(api::sampler::Reading {
            write_bytes: crate::sysinfo::process_write_bytes(),
            ..Default::default()
        }))),
        hub: hub.clone(),
        status_token: status_token.map(Into::into),
        data_dir: Arc::new(config.site.data_dir.clone()),
        log_max_bytes: config.log.max_bytes,
        write_budget: config.log.write_budget,
        endurance_tbw: config.disk.endurance_tbw,
        shutdown: stages.shutdown.clone(),
        tenant_usage,
    });
    ingest_routes.merge(stream_routes).merge(api_routes)
}

/// What each tenant holds of the shared pools: MQTT connections and
/// stream subscribers (the status page and `/metrics` show it).
fn tenant_usage(hub: &Arc<Hub>, mqtt: Option<Arc<mqtt::state::Sessions>>) -> api::status::TenantUsage {
    let hub = hub.clone();
    Arc::new(move || {
        use api::status::TenantUse;
        let mut by: std::collections::BTreeMap<String, TenantUse> = Default::default();
        let new = |t: &String| TenantUse { tenant: t.clone(), ..Default::default() };
        for (t, n) in hub.subscribers_by_tenant() {
            by.entry(t.clone()).or_insert_with(|| new(&t)).stream_subscribers = n;
        }
        for (t, n) in mqtt.as_ref().map(|s| s.connections_by_tenant()).unwrap_or_default() {
            by.entry(t.clone()).or_insert_with(|| new(&t)).mqtt_connections = n;
        }
        by.into_values().collect()
    })
}

/// Fails when the writer thread is gone while the appliance is not stopping
/// (it panicked): nothing could be acked any more.
async fn watch_writer(log: LogHandle, shutdown: CancellationToken) -> anyhow::Result<()> {
    tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        _ = log.closed() => bail!("the site log writer stopped"),
    }
}

/// The stages of one appliance: spawned on one tracker, stopped by one token.
struct Stages {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    failed: CancellationToken,
}

impl Stages {
    fn new() -> Self {
        Self { tracker: TaskTracker::new(), shutdown: CancellationToken::new(), failed: CancellationToken::new() }
    }

    /// Runs a stage. Its error or panic is logged and stops the appliance in
    /// order; the exit status then says a stage failed.
    fn spawn<F, E>(&self, name: &'static str, stage: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<anyhow::Error> + Send + 'static,
    {
        let task = tokio::spawn(stage);
        let (shutdown, failed) = (self.shutdown.clone(), self.failed.clone());
        self.tracker.spawn(async move {
            let why = match task.await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => format!("{:#}", e.into()),
                Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
                Err(e) => format!("aborted: {e}"),
            };
            tracing::error!(stage = name, error = why, "stage failed; shutting down");
            failed.cancel();
            shutdown.cancel();
        });
    }

    /// After shutdown (asked for, or a stage failed): waits for the stages,
    /// then for the writer to drain, all within `grace`.
    async fn supervise(self, writer: log::writer::WriterThread, grace: Duration) -> anyhow::Result<()> {
        self.shutdown.cancelled().await;
        let started = Instant::now();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            bail!("shutdown_grace ({grace:?}) passed with stages still running; committed events are safe");
        }
        // Every LogHandle is gone with its stage: the writer drains and stops.
        let remaining = grace.saturating_sub(started.elapsed()).max(Duration::from_millis(100));
        let join = tokio::task::spawn_blocking(move || writer.join());
        if tokio::time::timeout(remaining, join).await.is_err() {
            bail!("site log writer did not stop within shutdown_grace");
        }
        if self.failed.is_cancelled() {
            bail!("a stage failed; see the log above");
        }
        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "outpost stopped cleanly");
        Ok(())
    }
}

fn panic_message(p: Box<dyn Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}
