//! The device registry as the authenticator sees it: tenant → device →
//! revoked?, cached in memory.
//!
//! - A change made through this process (API register or revoke) applies at
//!   once; one made by another process (the CLI) within `REGISTRY_POLL`.
//! - A device the cache does not know is looked up in the site log before a
//!   token is refused, so `outpost device add` works the moment it returns.
//!   Only tokens whose signature verified get that far, so the look-up
//!   cannot be driven by strangers.
//! - Every change is announced (`changes`), so open sessions of a revoked
//!   device end without polling.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::log::{self, Readers, schema};

/// How often a running appliance looks for registry changes made by the CLI.
pub const REGISTRY_POLL: Duration = Duration::from_millis(250);

/// What the cache keeps of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    revoked: bool,
    gateway: bool,
    /// A child: its gateway.
    via: Option<String>,
}

impl Entry {
    fn of(d: &schema::Device) -> Self {
        Self { revoked: d.revoked_at.is_some(), gateway: d.gateway, via: d.via.clone() }
    }
}

/// In-memory view of the device registry.
pub struct Registry {
    devices: RwLock<HashMap<String, HashMap<String, Entry>>>,
    version: AtomicI64,
    /// Bumped on every change.
    changed: watch::Sender<u64>,
    /// The site log, for devices the cache does not know yet.
    log: Option<(PathBuf, Mutex<Option<Connection>>)>,
}

impl Default for Registry {
    fn default() -> Self {
        Self { devices: RwLock::default(), version: AtomicI64::new(0), changed: watch::Sender::new(0), log: None }
    }
}

impl Registry {
    /// A registry that falls back to the site log at `path` on a miss.
    pub fn for_log(path: PathBuf) -> Self {
        Self { log: Some((path, Mutex::new(None))), ..Self::default() }
    }

    /// `Some(revoked)` for a registered device, `None` for an unknown one.
    pub fn lookup(&self, tenant: &str, device_id: &str) -> Option<bool> {
        self.entry(tenant, device_id).map(|e| e.revoked)
    }

    /// Whether the device is a registered, unrevoked gateway.
    pub fn is_gateway(&self, tenant: &str, device_id: &str) -> bool {
        self.entry(tenant, device_id).is_some_and(|e| e.gateway && !e.revoked)
    }

    /// Whether `gateway` may publish for `child` now (the caller checked
    /// that `gateway` is one).
    pub fn child(&self, tenant: &str, gateway: &str, child: &str) -> schema::Child {
        let found = self.entry(tenant, child);
        schema::child_status(tenant, gateway, child, found.as_ref().map(|e| (e.revoked, e.via.as_deref())))
    }

    fn entry(&self, tenant: &str, device_id: &str) -> Option<Entry> {
        let cached = {
            let map = self.devices.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            map.get(tenant).and_then(|t| t.get(device_id)).cloned()
        };
        cached.or_else(|| self.read_through(tenant, device_id))
    }

    /// A device registered by another process (or a gateway's first event
    /// for a child) since the last refresh.
    fn read_through(&self, tenant: &str, device_id: &str) -> Option<Entry> {
        let device = self.with_log(|c| schema::device_by_id(c, tenant, device_id).ok().flatten())?;
        self.set(&device);
        Some(Entry::of(&device))
    }

    /// `f` on the site log's read connection (opened on first use); `None`
    /// without a log or when it cannot be opened.
    fn with_log<T>(&self, f: impl FnOnce(&Connection) -> Option<T>) -> Option<T> {
        let (path, conn) = self.log.as_ref()?;
        let mut conn = conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if conn.is_none() {
            *conn = log::open(path, true).ok();
        }
        f(conn.as_ref()?)
    }

    /// A device's secret (tenant, argon2id hash, permissions), read from the
    /// site log each time (a secret set by the CLI works at once). `tenant`
    /// `None`: the one tenant that has the device id with a secret.
    pub fn secret(&self, tenant: Option<&str>, device_id: &str) -> Option<(String, String, String)> {
        self.with_log(|c| schema::device_secret(c, tenant, device_id).ok().flatten())
    }

    /// Records a change made through this process (the device as stored).
    pub fn set(&self, device: &schema::Device) {
        let entry = Entry::of(device);
        let mut map = self.devices.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = map.entry(device.tenant.clone()).or_default().insert(device.device_id.clone(), entry.clone());
        drop(map);
        if old != Some(entry) {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Reloads everything from the log if any process changed the registry.
    pub fn refresh(&self, conn: &Connection) -> Result<bool, log::Error> {
        let version = schema::registry_version(conn)?;
        if version == self.version.load(Ordering::Acquire) {
            return Ok(false);
        }
        let mut fresh: HashMap<String, HashMap<String, Entry>> = HashMap::new();
        for d in schema::devices(conn, None)? {
            let entry = Entry::of(&d);
            fresh.entry(d.tenant).or_default().insert(d.device_id, entry);
        }
        *self.devices.write().unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        self.version.store(version, Ordering::Release);
        self.changed.send_modify(|v| *v += 1);
        Ok(true)
    }

    /// Fires after every change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Keeps the registry cache in step with changes from other processes
/// (`outpost device revoke` while the appliance runs): within `REGISTRY_POLL`.
pub async fn run_registry_refresh(
    readers: Readers,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<(), log::Error> {
    let mut tick = tokio::time::interval(REGISTRY_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        crate::failpoint::fire("registry_refresh");
        let reg = registry.clone();
        match readers.with(move |conn| reg.refresh(conn)).await {
            Ok(true) => tracing::info!("device registry changed; reloaded"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "device registry refresh failed"),
        }
    }
}
