//! The one place that starts stages, wires their channels and orders shutdown.
//!
//! Start: data dir → site log (migrations) → registry → keys → writer thread →
//! bind sockets → stages on one `TaskTracker` → `READY=1`.
//! Stop (token cancelled): listeners stop accepting, in-flight requests finish
//! (their appends commit), stages end, the last `LogHandle` drops, the writer
//! drains its queue and exits. Bounded by `shutdown_grace`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{self, Authenticator, Registry};
use crate::config::Config;
use crate::event::{InputLimits, now_us};
use crate::forward::{self, ForwardStatus, Forwarder, Uplink};
use crate::http::{self, AppState};
use crate::ingest::IngestHandle;
use crate::ingest::mqtt::{self, MqttDeps};
use crate::limits::Limiter;
use crate::log::{self, Readers, WriterConfig};
use crate::metrics::Metrics;
use crate::stream::Hub;
use crate::stream::listen::Listener;
use crate::systemd;

/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Rows deleted per prune transaction, so the writer is never held long.
const PRUNE_CHUNK: usize = 5000;

/// A started appliance.
pub struct Running {
    /// Where HTTP listens (the real port when configured with port 0).
    pub http_addr: SocketAddr,
    /// Where MQTT listens, when enabled.
    pub mqtt_addr: Option<SocketAddr>,
    /// Cancel to stop the appliance.
    pub shutdown: CancellationToken,
    supervisor: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until the appliance has stopped (after `shutdown` or a stage failure).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.supervisor.await.context("appliance supervisor panicked")?
    }

    /// Stops the appliance and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Runs the appliance until SIGTERM / SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Handlers before the first stage starts: /healthz answers (and the log
    // is open) before `start` returns, and a SIGTERM in that window must stop
    // the appliance in order, not kill it with the default disposition.
    let signal = shutdown_signal();
    let running = start(config).await?;
    systemd::ready();
    let shutdown = running.shutdown.clone();
    tokio::spawn(async move {
        signal.await;
        tracing::info!("shutdown requested; finishing in-flight requests");
        systemd::stopping();
        shutdown.cancel();
    });
    running.wait().await
}

/// Installs the SIGTERM / SIGINT handlers now; the future resolves at the
/// first of them (also one that arrived before it is polled).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        match handlers {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                tracing::error!("cannot install signal handlers; falling back to Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Starts every stage and returns once the sockets are bound.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let site_id = config.site_id();
    let data_dir = config.site.data_dir.clone();
    std::fs::create_dir_all(&data_dir).with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let log_path = config.log_path();
    let conn = {
        let p = log_path.clone();
        tokio::task::spawn_blocking(move || log::open_and_migrate(&p))
            .await
            .context("migration task panicked")?
            .with_context(|| format!("cannot open site log {}", log_path.display()))?
    };
    let readers = Readers::new(log_path.clone());
    let registry = Arc::new(Registry::default());
    {
        let reg = registry.clone();
        readers.with(move |c| reg.refresh(c)).await.context("cannot load device registry")?;
    }
    let (authenticator, created) =
        Authenticator::from_config(&config, registry.clone()).context("cannot load token keys")?;
    if created {
        tracing::info!(
            secret = %config.secret_path().display(),
            "first start: created the token signing secret. Register a device and get its token with: \
             outpost device add --tenant <tenant> --id <device-id>   (admin token: outpost token issue --admin)"
        );
    }
    let metrics = Arc::new(Metrics::new());
    // Configuration errors of the uplink stop the start, with the reason.
    let connector = match &config.central.url {
        Some(_) => Some(forward::service::Connector::new(&config.central).context("central database settings")?),
        None => None,
    };
    let forward_status =
        Arc::new(ForwardStatus::new(if connector.is_some() { Uplink::Connecting } else { Uplink::Disabled }));
    let committed = Arc::new(Notify::new());
    let hub = Hub::new(config.stream.queue, config.stream.max_subscribers, metrics.clone());
    let (log, writer) = log::writer::spawn_observed(
        conn,
        WriterConfig {
            max_bytes: config.log.max_bytes,
            commit_max_rows: config.log.commit_max_rows,
            commit_max_bytes: config.log.commit_max_bytes,
            queue_capacity: config.log.queue_capacity,
        },
        metrics.clone(),
        committed.clone(),
        Some(hub.clone() as Arc<dyn log::CommitObserver>),
    )?;
    let ingest = IngestHandle::new(
        log.clone(),
        Limiter::new(config.limits.clone()),
        metrics.clone(),
        site_id.clone(),
        InputLimits {
            max_payload_bytes: config.limits.max_payload_bytes,
            max_payload_depth: config.limits.max_payload_depth,
        },
        config.limits.max_batch,
    );
    let mqtt_listener = if config.mqtt.enabled {
        Some(
            TcpListener::bind(config.mqtt.listen)
                .await
                .with_context(|| format!("cannot listen on mqtt.listen = {}", config.mqtt.listen))?,
        )
    } else {
        None
    };
    let mqtt_addr = mqtt_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let http_listener = TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen on http.listen = {}", config.http.listen))?;
    let http_addr = http_listener.local_addr()?;
    let auth = Arc::new(authenticator);
    let mqtt_deps = match mqtt_listener {
        Some(l) => {
            let links = mqtt::start_router(config.mqtt.max_connections);
            // Remote events reach MQTT subscribers through a link of the hub's own.
            let (tx, rx, _) = links("outpost-hub".into(), true).map_err(|e| anyhow::anyhow!("mqtt router: {e}"))?;
            let link = std::sync::Mutex::new((tx, rx));
            hub.set_mqtt(Box::new(move |topic, payload| {
                if let Ok(mut l) = link.lock()
                    && let Err(e) = l.0.try_publish(topic, payload)
                {
                    tracing::debug!(error = %e, "remote event not published to MQTT (router busy)");
                }
            }));
            let deps = MqttDeps {
                ingest: ingest.clone(),
                auth: auth.clone(),
                links,
                metrics: metrics.clone(),
                config: config.mqtt.clone(),
                hub: hub.clone(),
            };
            Some((l, deps))
        }
        None => None,
    };
    let shutdown = CancellationToken::new();
    let state = AppState {
        ingest,
        auth,
        log: log.clone(),
        readers: readers.clone(),
        metrics: metrics.clone(),
        forward: forward_status.clone(),
        site_id: site_id.clone().into(),
        max_body: config.http.max_body_bytes,
        started: Instant::now(),
        status_cache: Default::default(),
        hub: hub.clone(),
        stream: config.stream.clone(),
        shutdown: shutdown.clone(),
    };

    let tracker = TaskTracker::new();
    let failed = CancellationToken::new();
    let spawn = |name: &'static str, fut: std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>| {
        let shutdown = shutdown.clone();
        let failed = failed.clone();
        tracker.spawn(async move {
            if let Err(e) = fut.await {
                tracing::error!(stage = name, error = format!("{e:#}"), "stage failed; shutting down");
                failed.cancel();
                shutdown.cancel();
            }
        });
    };
    let router = http::router(state);
    spawn(
        "http",
        Box::pin({
            let s = shutdown.clone();
            async move { http::run(http_listener, router, s).await.context("http server") }
        }),
    );
    spawn(
        "registry",
        Box::pin({
            let (r, s) = (readers.clone(), shutdown.clone());
            async move { auth::run_registry_refresh(r, registry, s).await.context("registry refresh") }
        }),
    );
    if let Some((listener, deps)) = mqtt_deps {
        let (t, s) = (tracker.clone(), shutdown.clone());
        spawn("mqtt", Box::pin(async move { mqtt::run(listener, deps, t, s).await.context("mqtt") }));
    }
    if let Some(connector) = connector {
        let listener = Listener {
            connector: connector.clone(),
            config: config.central.clone(),
            site_id: site_id.clone(),
            log: log.clone(),
            readers: readers.clone(),
            metrics: metrics.clone(),
        };
        let s = shutdown.clone();
        spawn("listen", Box::pin(async move { listener.run(s).await.context("central listen") }));
        let forwarder = Forwarder {
            connector,
            config: config.central.clone(),
            log: log.clone(),
            readers: readers.clone(),
            status: forward_status,
            metrics,
            wake: committed,
        };
        let s = shutdown.clone();
        spawn("forwarder", Box::pin(async move { forwarder.run(s).await.context("forwarder") }));
    } else {
        tracing::info!("central.url not set: buffering locally, nothing is forwarded");
    }
    spawn("retention", Box::pin(run_retention(log.clone(), config.log.retention, shutdown.clone())));
    spawn(
        "watchdog",
        Box::pin({
            let (l, s) = (log.clone(), shutdown.clone());
            async move { systemd::run_watchdog(l, s).await.context("watchdog") }
        }),
    );
    tracker.close();
    drop(log);

    tracing::info!(site_id, %http_addr, data_dir = %data_dir.display(), "outpost running; http listening on {http_addr}{}", mqtt_addr.map_or(String::new(), |a| format!(", mqtt listening on {a}")));

    let grace = config.shutdown_grace;
    let supervisor = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            let started = Instant::now();
            if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
                bail!("shutdown_grace ({grace:?}) passed with stages still running; committed events are safe");
            }
            // Every LogHandle is gone with its stage: the writer drains and stops.
            let remaining = grace.saturating_sub(started.elapsed()).max(Duration::from_millis(100));
            let join = tokio::task::spawn_blocking(move || writer.join());
            if tokio::time::timeout(remaining, join).await.is_err() {
                bail!("site log writer did not stop within shutdown_grace");
            }
            if failed.is_cancelled() {
                bail!("a stage failed; see the log above");
            }
            tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "outpost stopped cleanly");
            Ok(())
        }
    });
    Ok(Running { http_addr, mqtt_addr, shutdown, supervisor })
}

/// Retention: prunes forwarded rows older than `retention`, in chunks.
async fn run_retention(log: log::LogHandle, retention: Duration, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let cutoff = now_us() - i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            match log.prune(cutoff, PRUNE_CHUNK).await {
                Ok(n) => {
                    total += n;
                    if n < PRUNE_CHUNK || shutdown.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention prune failed; will retry");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(rows = total, "retention pruned forwarded events");
        }
    }
}
