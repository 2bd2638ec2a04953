//! `outpost doctor`: checks what an installation needs and prints one line
//! per check, `ok`, `warn` or `FAIL`, each problem with the fix.
//!
//! Exit status: non-zero when any check FAILs (the appliance would not start
//! or would lose its guarantees); warnings (it runs, but something deserves
//! attention: an unsynchronised clock, less free disk than the log budget, a
//! plain-text uplink) keep exit status 0.
//! Run it as the user the service runs as (`sudo -u outpost outpost doctor`).

use std::io::ErrorKind;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::config::{Algorithm, Config};
use crate::event::now_us;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Ok,
    Warn,
    Fail,
}

/// One printed line: the check, what was found, and the fix for a problem.
#[derive(Debug, Clone)]
pub(crate) struct Finding {
    pub level: Level,
    pub check: &'static str,
    pub message: String,
    pub fix: Option<String>,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        write!(f, "{tag}  {:<9} {}", self.check, self.message)?;
        if let Some(fix) = &self.fix {
            write!(f, " — fix: {fix}")?;
        }
        Ok(())
    }
}

fn ok(check: &'static str, message: impl Into<String>) -> Finding {
    Finding { level: Level::Ok, check, message: message.into(), fix: None }
}

fn warn(check: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding { level: Level::Warn, check, message: message.into(), fix: Some(fix.into()) }
}

fn fail(check: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding { level: Level::Fail, check, message: message.into(), fix: Some(fix.into()) }
}

/// Runs every check, prints each line as it completes, and fails when any
/// check FAILs.
pub(crate) async fn run(config_path: Option<&Path>) -> anyhow::Result<()> {
    let mut findings = Vec::new();
    let mut report = |f: Finding| {
        println!("{f}");
        findings.push(f);
    };
    let shown = config_path.map_or("the built-in defaults + OUTPOST_* environment".into(), |p| p.display().to_string());
    match Config::load(config_path, std::env::vars()) {
        Err(e) => report(fail(
            "config",
            format!("{shown}: {}", e.to_string().replace('\n', " ")),
            format!(
                "correct it (`outpost config check{}` lists every problem)",
                config_path.map_or(String::new(), |p| format!(" {}", p.display()))
            ),
        )),
        Ok(cfg) => {
            report(ok("config", format!("{shown} is valid")));
            for f in data_dir(&cfg) {
                report(f);
            }
            report(disk(&cfg));
            report(clock_sync());
            report(future_events(&cfg));
            for f in ports(&cfg).await {
                report(f);
            }
            if let Some(f) = tls(&cfg) {
                report(f);
            }
            for f in central(&cfg).await {
                report(f);
            }
        }
    }
    let failed = findings.iter().filter(|f| f.level == Level::Fail).count();
    let warned = findings.iter().filter(|f| f.level == Level::Warn).count();
    if failed > 0 {
        anyhow::bail!("doctor: {failed} check(s) failed, {warned} warning(s)");
    }
    println!("doctor: all checks passed{}", if warned > 0 { format!(" ({warned} warning(s))") } else { String::new() });
    Ok(())
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The data directory and what the service keeps in it: owned by the user
/// running outpost, not readable by others; the HS256 secret mode 0600.
pub(crate) fn data_dir(cfg: &Config) -> Vec<Finding> {
    let dir = &cfg.site.data_dir;
    let me = euid();
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return vec![warn(
                "data dir",
                format!("{} does not exist yet (outpost creates it at first start)", dir.display()),
                format!("nothing, or create it now: install -d -m 0700 {}", dir.display()),
            )];
        }
        Err(e) => {
            return vec![fail(
                "data dir",
                format!("{}: {e}", dir.display()),
                format!("run the doctor as the service user, or make {} reachable for it", dir.display()),
            )];
        }
    };
    let mut out = Vec::new();
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() {
        out.push(fail(
            "data dir",
            format!("{} is not a directory", dir.display()),
            "point site.data_dir at a directory",
        ));
        return out;
    }
    if meta.uid() != me {
        out.push(if me == 0 {
            warn(
                "data dir",
                format!("{} is owned by uid {}, and the doctor runs as root", dir.display(), meta.uid()),
                "run it as the service user to check what the service sees: sudo -u outpost outpost doctor",
            )
        } else {
            fail(
                "data dir",
                format!("{} is owned by uid {}, not by the user running outpost (uid {me})", dir.display(), meta.uid()),
                format!("chown -R {me} {}", dir.display()),
            )
        });
    }
    if mode & 0o007 != 0 {
        out.push(fail(
            "data dir",
            format!("{} has mode {mode:04o}: other users can read the site log and the signing secret", dir.display()),
            format!("chmod 0700 {}", dir.display()),
        ));
    }
    // Files the service cannot open (e.g. made by running the CLI as root).
    let foreign: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.metadata().is_ok_and(|m| m.uid() != meta.uid()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if !foreign.is_empty() {
        out.push(fail(
            "data dir",
            format!("{} holds files of another owner than the directory's: {}", dir.display(), foreign.join(", ")),
            format!("chown -R {} {} (run CLI commands as the service user)", meta.uid(), dir.display()),
        ));
    }
    if out.is_empty() {
        out.push(ok("data dir", format!("{} owned by uid {}, mode {mode:04o}", dir.display(), meta.uid())));
    }
    if cfg.auth.algorithm == Algorithm::HS256 {
        let secret = cfg.secret_path();
        match std::fs::metadata(&secret) {
            Ok(m) if m.mode() & 0o077 != 0 => out.push(fail(
                "secret",
                format!("{} has mode {:04o}: others can forge tokens", secret.display(), m.mode() & 0o7777),
                format!("chmod 0600 {}", secret.display()),
            )),
            Ok(m) if m.uid() != me && me != 0 => out.push(fail(
                "secret",
                format!("{} is owned by uid {}, not by the user running outpost (uid {me})", secret.display(), m.uid()),
                format!("chown {me} {}", secret.display()),
            )),
            Ok(_) => out.push(ok("secret", format!("{} mode 0600", secret.display()))),
            Err(e) if e.kind() == ErrorKind::NotFound => out.push(ok(
                "secret",
                format!("{} not created yet (made with mode 0600 at first start)", secret.display()),
            )),
            Err(e) => out.push(fail(
                "secret",
                format!("{}: {e}", secret.display()),
                "run the doctor as the service user; the secret must be readable by it",
            )),
        }
    }
    out
}

/// Free space on the data dir's file system against what the log may still
/// grow by (`log.max_bytes` minus its current size).
pub(crate) fn disk(cfg: &Config) -> Finding {
    let dir = nearest_existing(&cfg.site.data_dir);
    let Some(avail) = available_bytes(&dir) else {
        return warn("disk", format!("cannot read the free space of {}", dir.display()), "check the mount with df -h");
    };
    let used: u64 = ["site-log.sqlite", "site-log.sqlite-wal", "site-log.sqlite-shm"]
        .iter()
        .filter_map(|f| std::fs::metadata(cfg.site.data_dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    let growth = cfg.log.max_bytes.saturating_sub(used);
    let mib = |b: u64| b / (1024 * 1024);
    let msg = format!(
        "{} MiB free on {}; the log uses {} MiB of log.max_bytes = {} MiB",
        mib(avail),
        dir.display(),
        mib(used),
        mib(cfg.log.max_bytes)
    );
    // Below this SQLite cannot even checkpoint; ingest fails, not backpressures.
    const FLOOR: u64 = 64 * 1024 * 1024;
    if avail < FLOOR {
        fail("disk", msg, "free space on that file system, or move site.data_dir to a bigger one")
    } else if avail < growth {
        warn(
            "disk",
            msg,
            format!(
                "set log.max_bytes to at most {} (the disk fills before the budget, and a full disk fails writes instead of answering 503)",
                used + avail - FLOOR
            ),
        )
    } else {
        ok("disk", msg)
    }
}

fn nearest_existing(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    abs.ancestors().find(|p| p.exists()).map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
}

fn available_bytes(path: &Path) -> Option<u64> {
    crate::sysinfo::fs_space(path).map(|s| s.available)
}

/// NTP synchronisation as systemd-timesyncd / chrony report it to timedated.
pub(crate) fn clock_sync() -> Finding {
    let out = std::process::Command::new("timedatectl").args(["show", "-p", "NTPSynchronized", "--value"]).output();
    match out {
        Ok(o) if o.status.success() => match String::from_utf8_lossy(&o.stdout).trim() {
            "yes" => ok("clock", "synchronised (NTP)"),
            "no" => warn(
                "clock",
                "not synchronised: event timestamps and token expiry depend on it",
                "timedatectl set-ntp true (and let the box reach an NTP server)",
            ),
            other => warn(
                "clock",
                format!("synchronisation unknown (timedatectl said {other:?})"),
                "check timedatectl status",
            ),
        },
        Ok(o) => warn(
            "clock",
            format!(
                "synchronisation unknown: timedatectl: {}",
                String::from_utf8_lossy(&o.stderr).trim().replace('\n', "; ")
            ),
            "make sure an NTP client keeps the clock right (timedatectl works only where systemd runs)",
        ),
        Err(_) => {
            warn("clock", "synchronisation unknown (no timedatectl)", "make sure an NTP client keeps the clock right")
        }
    }
}

/// Events this site received "in the future": the clock was ahead then, or
/// is behind now. Either way timestamps and retention are off.
pub(crate) fn future_events(cfg: &Config) -> Finding {
    let path = cfg.log_path();
    if !path.exists() {
        return ok("clock", "no site log yet, so no event timestamps to compare");
    }
    let now = now_us();
    let limit = now + 5 * 60 * 1_000_000;
    let counted = crate::log::open(&path, true).map_err(|e| e.to_string()).and_then(|c| {
        c.query_row(
            "SELECT count(*), max(received_at) FROM events WHERE origin_site = ?1 AND received_at > ?2",
            rusqlite::params![cfg.site_id(), limit],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?)),
        )
        .map_err(|e| e.to_string())
    });
    match counted {
        Err(e) => warn("clock", format!("cannot read {}: {e}", path.display()), "run the doctor as the service user"),
        Ok((0, _)) => ok("clock", "no event in the site log was received in the future"),
        Ok((n, latest)) => {
            let ahead = latest.map_or(0, |l| (l - now) / 1_000_000);
            warn(
                "clock",
                format!("{n} event(s) in the site log were received up to {ahead} s in the future of the clock now"),
                "the clock jumped back (no RTC?): keep NTP on; those events keep their timestamps",
            )
        }
    }
}

/// The TLS listeners' certificate and key load and belong together, and
/// the devices' CA (`tls.client_ca_file`) loads, as the start would check
/// them (None without TLS listeners).
fn tls(cfg: &Config) -> Option<Finding> {
    if !cfg.tls_listeners() {
        return None;
    }
    let loaded = match cfg.tls.client_ca_file {
        Some(_) => "tls.cert_file and tls.key_file load and match; tls.client_ca_file loads",
        None => "tls.cert_file and tls.key_file load and match",
    };
    Some(match crate::tls::Certs::load(&cfg.tls) {
        Ok(_) => ok("tls", loaded),
        Err(e) if e.starts_with("tls.client_ca_file") => fail(
            "tls",
            e,
            "point tls.client_ca_file at the PEM certificate(s) of the CA that signs device certificates, readable by the service user",
        ),
        Err(e) => fail(
            "tls",
            e,
            "point tls.cert_file at the PEM chain (leaf first) and tls.key_file at its key, readable by the service user",
        ),
    })
}

/// The HTTP and MQTT listen addresses can be bound, or are bound by a
/// running outpost (then that is fine).
pub(crate) async fn ports(cfg: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut listeners = vec![("http", "http.listen", cfg.http.listen)];
    if let Some(a) = cfg.http.tls_listen {
        listeners.push(("https", "http.tls_listen", a));
    }
    if cfg.mqtt.enabled {
        listeners.push(("mqtt", "mqtt.listen", cfg.mqtt.listen));
        if let Some(a) = cfg.mqtt.tls_listen {
            listeners.push(("mqtts", "mqtt.tls_listen", a));
        }
    }
    let mut running: Option<Option<String>> = None;
    for (check, key, addr) in listeners {
        match TcpListener::bind(addr) {
            Ok(l) => {
                drop(l);
                out.push(ok(check, format!("{key} {addr} can be bound")));
            }
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                if running.is_none() {
                    running = Some(running_outpost(&cfg.http).await);
                }
                match running.as_ref().and_then(|r| r.as_ref()) {
                    Some(site) => {
                        out.push(ok(check, format!("{key} {addr} is in use by the running outpost (site {site})")))
                    }
                    None => out.push(fail(
                        check,
                        format!("{key} {addr} is in use by another program"),
                        format!("stop it (ss -ltnp 'sport = :{}' shows which) or change {key}", addr.port()),
                    )),
                }
            }
            Err(e) if e.kind() == ErrorKind::PermissionDenied => out.push(fail(
                check,
                format!("{key} {addr}: permission denied"),
                format!(
                    "use a port from 1024 up, or grant CAP_NET_BIND_SERVICE (AmbientCapabilities= in the unit) for {}",
                    addr.port()
                ),
            )),
            Err(e) => out.push(fail(
                check,
                format!("{key} {addr}: {e}"),
                format!("set {key} to an address of this machine (0.0.0.0:{} for all)", addr.port()),
            )),
        }
    }
    out
}

/// The site id of an outpost answering `/api/v1/status` on `http.listen`
/// (with the status token when one is configured).
async fn running_outpost(http: &crate::config::HttpConfig) -> Option<String> {
    let v = crate::live::status(http).await?;
    v["uplink"].is_object().then(|| v["site_id"].as_str().unwrap_or("?").to_string())
}

/// Central reachable (with the forwarder's own connector: TLS verified
/// against central.ca_file or the system CAs), encrypted, and allowed to
/// create tenant schemas when central.migrate is on.
pub(crate) async fn central(cfg: &Config) -> Vec<Finding> {
    let c = &cfg.central;
    let Some(url) = &c.url else {
        return vec![ok("central", "central.url not set: the site buffers locally")];
    };
    let shown = crate::config::redact_url(url);
    let connector = match crate::central::Connector::new(c) {
        Ok(k) => k,
        Err(e) => {
            return vec![fail(
                "central",
                e.to_string(),
                "correct central.url / central.password_file / central.ca_file",
            )];
        }
    };
    let (client, connection) = match connector.connect_raw("outpost-doctor").await {
        Ok(pair) => pair,
        Err(e) => {
            let text = e.to_string();
            let fix = if text.contains("certificate") || text.contains("TLS") || text.contains("tls") {
                "set central.ca_file to the PEM of the CA that signed the server's certificate (the host name in central.url must match it)"
            } else if text.contains("password") || text.contains("28P01") || text.contains("28000") {
                "check the user in central.url and the password (central.password_file or OUTPOST_CENTRAL_PASSWORD) and pg_hba.conf"
            } else {
                "check that the host and port in central.url are reachable from here (firewall, DNS) and the server runs"
            };
            return vec![fail("central", format!("{shown}: {text}"), fix)];
        }
    };
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut out = Vec::new();
    out.push(ok("central", format!("{shown} reachable")));
    match client.query_opt("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await {
        Ok(Some(row)) if row.get::<_, bool>(0) => {
            out.push(ok("tls", "the central connection is TLS, certificate verified"))
        }
        Ok(_) => out.push(warn(
            "tls",
            format!("the central connection is not encrypted (central.tls = {:?})", c.tls).to_lowercase(),
            "enable ssl on the server and set central.tls = \"require\"",
        )),
        Err(e) => {
            out.push(warn("tls", format!("cannot tell whether TLS is used: {e}"), "check with the database admin"))
        }
    }
    match client
        .query_one(
            "SELECT has_database_privilege(current_database(), 'CREATE'), current_user::text, current_database()::text",
            &[],
        )
        .await
    {
        Ok(row) => {
            let (can, user, db): (bool, String, String) = (row.get(0), row.get(1), row.get(2));
            if can {
                out.push(ok("schemas", format!("{user} may create tenant schemas in {db}")));
            } else if c.migrate {
                out.push(fail(
                    "schemas",
                    format!("{user} may not create schemas in {db}, and central.migrate = true"),
                    format!("GRANT CREATE ON DATABASE {db} TO {user}; or have an admin run outpost migrate --central and set central.migrate = false"),
                ));
            } else {
                out.push(ok(
                    "schemas",
                    format!("{user} may not create schemas in {db}; central.migrate = false, so an admin migrates"),
                ));
            }
        }
        Err(e) => out.push(fail("schemas", format!("cannot check privileges: {e}"), "check the central user's rights")),
    }
    task.abort();
    out
}
