//! Command line: run, migrate, config, device, token, status, replay,
//! dead-letter (the load generators are `outpost-bench`, a separate binary).
//! Commands other than `run` work on the site log file directly,
//! so they also work while the appliance is stopped; a running appliance
//! picks up device changes within a second.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::auth::{Authenticator, Perm, Registry};
use crate::auth::{parse_perms, parse_ttl};
use crate::config::{Config, DEFAULT_TOML};
use crate::event::{Tenant, now_us, validate_device_id};
use crate::log::{self, schema};

/// outpost: durable event ingest for edge sites.
#[derive(Parser, Debug)]
#[command(name = "outpost", version, about, propagate_version = true)]
pub struct Cli {
    /// Config file (TOML). Without one, built-in defaults apply;
    /// OUTPOST_{SECTION}__{KEY} environment variables override either.
    #[arg(long, short, global = true, env = "OUTPOST_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the appliance until SIGTERM / SIGINT.
    Run,
    /// Create or upgrade the site log schema (and with --central, the tenant
    /// schemas of the central database), then exit.
    Migrate {
        /// Also migrate the central database: every tenant of the registered
        /// devices, plus central.tenants, plus --tenant.
        #[arg(long)]
        central: bool,
        /// Extra tenant to migrate centrally (repeatable).
        #[arg(long = "tenant", requires = "central")]
        tenants: Vec<String>,
        /// Also partition by time a tenant's `events` table that already
        /// holds rows (new tenants are partitioned at once). Copies the rows
        /// in one transaction and locks the table meanwhile: run it when
        /// writers can wait.
        #[arg(long, requires = "central")]
        partition_existing: bool,
    },
    /// Mark forwarded events pending again so they are sent once more
    /// (safe: central inserts are idempotent). Only this site's own events.
    Replay {
        /// Start: RFC 3339 time, or a duration ago ("2h").
        #[arg(long)]
        since: String,
        /// End (exclusive): RFC 3339 time, or a duration ago. Default: now.
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Events the central database refused.
    #[command(subcommand, name = "dead-letter")]
    DeadLetter(DeadLetterCommand),
    /// Print or check configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage the device registry.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Issue tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Backlog, oldest pending event, devices and log size.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check the installation (config, data dir, disk, clock, ports,
    /// central) and print the fix for each problem; exit 1 if any check fails.
    Doctor,
}

#[derive(Subcommand, Debug)]
pub enum DeadLetterCommand {
    /// List dead letters with the central error.
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Put dead letters back in the forwarding queue (same seq).
    Retry {
        /// Every dead letter.
        #[arg(long, conflicts_with = "seqs")]
        all: bool,
        /// Seqs to retry.
        seqs: Vec<i64>,
    },
    /// Delete dead letters for good.
    Purge {
        #[arg(long, conflicts_with = "seqs")]
        all: bool,
        seqs: Vec<i64>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the annotated default configuration.
    PrintDefault,
    /// Check a config file (and the environment), listing every problem.
    Check {
        /// File to check (default: --config, else defaults + environment).
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Register a device and print its token (shown once).
    Add {
        #[arg(long)]
        tenant: String,
        /// Device id (default: generated). [A-Za-z0-9_.:-], 1-255 characters.
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// Print a short secret (24 characters, for firmware that cannot
        /// hold a token; MQTT login: username <tenant>/<id>) instead of a
        /// token. It has the --perm permissions and never expires.
        #[arg(long)]
        secret: bool,
        /// A gateway (a Zigbee or LoRa bridge, a PLC): it may publish for
        /// its children, registered with --via or by its first publish for
        /// them (within mqtt.gateway_max_children).
        #[arg(long)]
        gateway: bool,
        /// A child of this gateway (registered with --gateway): the gateway
        /// may publish for it; it may also log in itself (and, with
        /// --gateway too, be a gateway for children of its own).
        #[arg(long, value_name = "GATEWAY")]
        via: Option<String>,
        #[command(flatten)]
        token: TokenArgs,
    },
    /// Give a registered device a new secret (the old one stops working)
    /// and print it (shown once). MQTT login: username <tenant>/<id>,
    /// password the secret.
    Secret {
        /// Device id.
        id: String,
        #[arg(long)]
        tenant: String,
        /// This secret (16-32 printable ASCII characters) instead of a
        /// generated one.
        #[arg(long)]
        set: Option<String>,
        /// Permission (repeatable): write_events, read_events, read_config.
        /// Default: write_events + read_events.
        #[arg(long = "perm")]
        perms: Vec<String>,
    },
    /// List registered devices.
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a device: its tokens stop working (within 1 s on a running appliance).
    Revoke {
        /// Device id.
        id: String,
        /// Tenant, needed when the id exists in several tenants.
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// Token lifetime, e.g. 30d, 12h (default: auth.token_ttl).
    #[arg(long)]
    ttl: Option<String>,
    /// Permission (repeatable): write_events, read_events, read_config.
    /// Default: write_events + read_events.
    #[arg(long = "perm")]
    perms: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Issue a token for a registered device, or an admin token.
    Issue {
        #[arg(long, required_unless_present = "admin")]
        tenant: Option<String>,
        #[arg(long, required_unless_present = "admin")]
        device: Option<String>,
        /// Issue an admin token (manages devices over HTTP).
        #[arg(long, conflicts_with_all = ["tenant", "device"])]
        admin: bool,
        #[command(flatten)]
        token: TokenArgs,
    },
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let load = |path: Option<&std::path::Path>| Config::load(path, std::env::vars()).map_err(anyhow::Error::from);
    match cli.command {
        Command::Config(ConfigCommand::PrintDefault) => {
            print!("{DEFAULT_TOML}");
            Ok(())
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let path = file.or(cli.config);
            let cfg = load(path.as_deref())?;
            println!(
                "ok: {} is valid (site.id = {}, data_dir = {})",
                path.map_or("configuration".into(), |p| p.display().to_string()),
                cfg.site_id(),
                cfg.site.data_dir.display()
            );
            Ok(())
        }
        Command::Run => crate::app::run(load(cli.config.as_deref())?).await,
        Command::Migrate { central, tenants, partition_existing } => {
            let cfg = load(cli.config.as_deref())?;
            let conn = open_log(&cfg)?;
            println!("site log {} is up to date", cfg.log_path().display());
            if central {
                if cfg.central.url.is_none() {
                    bail!("--central: central.url is not set");
                }
                let mut configured = cfg.central.tenants.clone();
                configured.extend(tenants);
                let all = schema::known_tenants(&conn, &configured)?;
                for t in &all {
                    check_tenant_arg(t)?;
                }
                if all.is_empty() {
                    println!("no tenants known yet (no devices, central.tenants empty): nothing to migrate centrally");
                }
                for (t, m) in crate::forward::migrate_central(&cfg.central, &all, partition_existing).await? {
                    let partitions = match (m.partitioned, m.converted) {
                        (true, true) => "now partitioned by time",
                        (true, false) => "partitioned by time",
                        (false, _) => {
                            "NOT partitioned: its events table holds rows; --partition-existing converts it (copies the rows)"
                        }
                    };
                    println!(
                        "central tenant_{t}: {}, {partitions} (notify = {:?})",
                        if m.applied == 0 {
                            "up to date".to_string()
                        } else {
                            format!("{} migration(s) applied", m.applied)
                        },
                        cfg.central.notify
                    );
                    if m.dropped > 0 {
                        println!("central tenant_{t}: {} partition(s) past central.retention dropped", m.dropped);
                    }
                }
            }
            Ok(())
        }
        Command::Replay { since, until, tenant } => {
            replay(&load(cli.config.as_deref())?, &since, until.as_deref(), tenant.as_deref())
        }
        Command::DeadLetter(cmd) => dead_letter(cmd, &load(cli.config.as_deref())?),
        Command::Device(cmd) => device(cmd, &load(cli.config.as_deref())?),
        Command::Token(cmd) => token(cmd, &load(cli.config.as_deref())?),
        Command::Status { json } => status(&load(cli.config.as_deref())?, json).await,
        Command::Doctor => crate::doctor::run(cli.config.as_deref()).await,
    }
}

fn open_log(cfg: &Config) -> anyhow::Result<rusqlite::Connection> {
    cfg.create_data_dir().with_context(|| format!("cannot create {}", cfg.site.data_dir.display()))?;
    log::open_and_migrate(&cfg.log_path()).with_context(|| format!("cannot open {}", cfg.log_path().display()))
}

fn authenticator(cfg: &Config) -> anyhow::Result<Authenticator> {
    let (a, created) = Authenticator::from_config(cfg, Arc::new(Registry::default()))?;
    if created {
        eprintln!("created token signing secret {}", cfg.secret_path().display());
    }
    Ok(a)
}

/// `--perm` flags, or the default permissions when none are given.
fn perm_args(perms: &[String]) -> anyhow::Result<Vec<Perm>> {
    if perms.is_empty() {
        return Ok(Perm::DEFAULT.to_vec());
    }
    parse_perms(perms).map_err(|m| anyhow::anyhow!("--perm: {m}"))
}

fn token_options(args: &TokenArgs) -> anyhow::Result<(Vec<Perm>, Option<Duration>)> {
    let perms = perm_args(&args.perms)?;
    let ttl = args.ttl.as_deref().map(parse_ttl).transpose().map_err(|m| anyhow::anyhow!("--ttl: {m}"))?;
    Ok((perms, ttl))
}

fn check_tenant_arg(tenant: &str) -> anyhow::Result<()> {
    Tenant::parse(tenant).map_err(|e| anyhow::anyhow!("--tenant {tenant:?}: {}", e.message))?;
    Ok(())
}

/// Sets a device's secret (`given`, or a generated one); returns it. Only
/// its argon2id hash is stored.
fn set_secret(
    conn: &rusqlite::Connection,
    tenant: &str,
    id: &str,
    given: Option<&str>,
    perms: &[Perm],
) -> anyhow::Result<String> {
    let secret = match given {
        Some(s) => {
            crate::auth::secret::check(s).map_err(|m| anyhow::anyhow!("--set: {m}"))?;
            s.to_string()
        }
        None => crate::auth::secret::generate()?,
    };
    let hash = crate::auth::secret::hash(&secret).map_err(|m| anyhow::anyhow!("hashing the secret: {m}"))?;
    let perms = crate::auth::secret::perms_field(perms);
    schema::set_device_secret(conn, tenant, id, &hash, &perms, now_us())?;
    Ok(secret)
}

fn device(cmd: DeviceCommand, cfg: &Config) -> anyhow::Result<()> {
    let conn = open_log(cfg)?;
    match cmd {
        DeviceCommand::Add { tenant, id, name, secret, gateway, via, token } => {
            check_tenant_arg(&tenant)?;
            let id = id.unwrap_or_else(crate::event::new_device_id);
            validate_device_id(&id).map_err(|e| anyhow::anyhow!("--id {id:?}: {}", e.message))?;
            let (perms, ttl) = token_options(&token)?;
            let role = schema::Role { gateway, via };
            if secret {
                let d = schema::add_device(&conn, &tenant, &id, name.as_deref(), &role, now_us())?;
                let s = set_secret(&conn, &d.tenant, &d.device_id, None, &perms)?;
                eprintln!(
                    "registered device {t}/{d} — its secret (shown once; MQTT username {t}/{d}, password the secret):",
                    t = d.tenant,
                    d = d.device_id
                );
                println!("{s}");
                return Ok(());
            }
            let auth = authenticator(cfg)?;
            let d = schema::add_device(&conn, &tenant, &id, name.as_deref(), &role, now_us())?;
            let t = auth.issue_device(&tenant, &id, &perms, ttl)?;
            eprintln!("registered device {}/{} — its token (shown once):", d.tenant, d.device_id);
            println!("{t}");
            Ok(())
        }
        DeviceCommand::List { tenant } => {
            let devices = schema::devices(&conn, tenant.as_deref())?;
            println!(
                "{:<16} {:<32} {:<8} {:>10}  {:<25}  {:<24}  name",
                "tenant", "device", "state", "events", "last seen", "role"
            );
            for d in &devices {
                let role = match (&d.via, d.gateway) {
                    (Some(gw), _) => format!("via {gw}"),
                    (None, true) => "gateway".into(),
                    (None, false) => String::new(),
                };
                println!(
                    "{:<16} {:<32} {:<8} {:>10}  {:<25}  {:<24}  {}",
                    d.tenant,
                    d.device_id,
                    if d.revoked_at.is_some() {
                        "revoked"
                    } else if d.online {
                        "online"
                    } else {
                        "active"
                    },
                    d.event_count,
                    d.last_seen.map_or("never".into(), fmt_time),
                    role,
                    d.name.as_deref().unwrap_or("")
                );
            }
            eprintln!("{} device(s)", devices.len());
            Ok(())
        }
        DeviceCommand::Secret { id, tenant, set, perms } => {
            check_tenant_arg(&tenant)?;
            let perms = perm_args(&perms)?;
            let s = set_secret(&conn, &tenant, &id, set.as_deref(), &perms)?;
            eprintln!("new secret of {tenant}/{id} (shown once; the old one no longer works):");
            println!("{s}");
            Ok(())
        }
        DeviceCommand::Revoke { id, tenant } => {
            let tenant = match tenant {
                Some(t) => t,
                None => {
                    let matches: Vec<_> =
                        schema::devices(&conn, None)?.into_iter().filter(|d| d.device_id == id).collect();
                    match matches.as_slice() {
                        [one] => one.tenant.clone(),
                        [] => bail!("no device {id:?} in any tenant"),
                        _ => bail!("device {id:?} exists in several tenants; pass --tenant"),
                    }
                }
            };
            let d = schema::revoke_device(&conn, &tenant, &id, now_us())?;
            println!("revoked {}/{}; its tokens no longer work", d.tenant, d.device_id);
            Ok(())
        }
    }
}

fn token(cmd: TokenCommand, cfg: &Config) -> anyhow::Result<()> {
    let TokenCommand::Issue { tenant, device, admin, token } = cmd;
    let (perms, ttl) = token_options(&token)?;
    let auth = authenticator(cfg)?;
    if admin {
        println!("{}", auth.issue_admin(ttl)?);
        return Ok(());
    }
    let (Some(tenant), Some(device)) = (tenant, device) else {
        bail!("--tenant and --device are required (or --admin)");
    };
    check_tenant_arg(&tenant)?;
    let conn = open_log(cfg)?;
    match schema::device_by_id(&conn, &tenant, &device)? {
        None => bail!(
            "device {tenant}/{device} is not registered; add it first: outpost device add --tenant {tenant} --id {device}"
        ),
        Some(d) if d.revoked_at.is_some() => bail!("device {tenant}/{device} is revoked"),
        Some(_) => {}
    }
    println!("{}", auth.issue_device(&tenant, &device, &perms, ttl)?);
    Ok(())
}

fn fmt_time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Parses an RFC 3339 time or a duration ago ("2h") into µs since the epoch.
fn parse_when(arg: &str, s: &str) -> anyhow::Result<i64> {
    if let Some(us) = crate::event::parse_rfc3339_us(s) {
        return Ok(us);
    }
    let ago = humantime::parse_duration(s)
        .map_err(|_| anyhow::anyhow!("{arg} {s:?}: not an RFC 3339 time nor a duration ago like 2h"))?;
    Ok(now_us() - i64::try_from(ago.as_micros()).unwrap_or(i64::MAX))
}

fn replay(cfg: &Config, since: &str, until: Option<&str>, tenant: Option<&str>) -> anyhow::Result<()> {
    let since_us = parse_when("--since", since)?;
    let until_us = until.map(|u| parse_when("--until", u)).transpose()?.unwrap_or_else(now_us);
    if until_us <= since_us {
        bail!("--until must be after --since");
    }
    if let Some(t) = tenant {
        check_tenant_arg(t)?;
    }
    let conn = open_log(cfg)?;
    let site = cfg.site_id();
    let (mut total, mut after) = (0, 0);
    while let (n, Some(last)) = schema::replay_chunk(&conn, &site, since_us, until_us, tenant, after, 10_000)? {
        total += n;
        after = last;
        eprintln!("replay: {total} events marked pending so far…");
    }
    println!(
        "replay: {total} events of site {site} received {} – {} marked pending; the forwarder sends them again (duplicates are ignored centrally)",
        fmt_time(crate::event::from_us(since_us)),
        fmt_time(crate::event::from_us(until_us))
    );
    Ok(())
}

fn dead_letter(cmd: DeadLetterCommand, cfg: &Config) -> anyhow::Result<()> {
    let conn = open_log(cfg)?;
    let pick = |all: bool, seqs: &[i64]| -> anyhow::Result<Option<Vec<i64>>> {
        match (all, seqs.is_empty()) {
            (true, _) => Ok(None),
            (false, false) => Ok(Some(seqs.to_vec())),
            (false, true) => bail!("name the seqs to act on, or pass --all"),
        }
    };
    match cmd {
        DeadLetterCommand::List { tenant, limit } => {
            let rows = schema::dead_letters(&conn, tenant.as_deref(), limit)?;
            for d in &rows {
                println!(
                    "seq {} {} {}/{} {} at {}: {}",
                    d.seq,
                    d.id,
                    d.tenant,
                    d.device_id,
                    d.event_type,
                    fmt_time(d.failed_at),
                    d.error
                );
            }
            eprintln!("{} dead letter(s) shown", rows.len());
        }
        DeadLetterCommand::Retry { all, seqs } => {
            let n = schema::retry_dead_letters(&conn, pick(all, &seqs)?.as_deref())?;
            println!("{n} dead letter(s) back in the forwarding queue");
        }
        DeadLetterCommand::Purge { all, seqs } => {
            let n = schema::purge_dead_letters(&conn, pick(all, &seqs)?.as_deref())?;
            println!("{n} dead letter(s) purged");
        }
    }
    Ok(())
}

async fn status(cfg: &Config, json: bool) -> anyhow::Result<()> {
    if !cfg.log_path().exists() {
        bail!("no site log at {} (has the appliance run with this config?)", cfg.log_path().display());
    }
    let conn = log::open(&cfg.log_path(), true)?;
    let s = schema::status(&conn, now_us())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("site            {}", cfg.site_id());
    println!("log             {} ({:.1} MiB)", cfg.log_path().display(), s.log_bytes as f64 / 1048576.0);
    println!("events          {} (last seq {})", s.total_rows, s.last_seq);
    println!("backlog         {} waiting to forward", s.backlog_rows);
    println!("oldest pending  {}", s.oldest_pending_age_seconds.map_or("none".into(), |a| format!("{a:.0} s ago")));
    println!("backlog bytes   {}", s.backlog_bytes);
    println!("dead letters    {}", s.dead_letters);
    println!("devices         {} ({} revoked)", s.devices, s.devices_revoked);
    match &cfg.central.url {
        None => println!("central         not configured (buffering only)"),
        Some(url) => {
            println!("central         {}", crate::config::redact_url(url));
            match crate::live::status(&cfg.http).await {
                Some(v) => {
                    let u = &v["uplink"];
                    println!(
                        "uplink          {} since {}{}",
                        u["state"].as_str().unwrap_or("?"),
                        u["since"].as_str().unwrap_or("?"),
                        u["last_error"].as_str().map_or(String::new(), |e| format!(" (last error: {e})"))
                    );
                    println!(
                        "drain           {:.0} rows/s{}",
                        u["forwarded_rows_per_second"].as_f64().unwrap_or(0.0),
                        v["drain_eta_seconds"].as_f64().map_or(String::new(), |e| format!(", ETA {e:.0} s"))
                    );
                }
                None => println!("uplink          unknown: the appliance is not answering on {}", cfg.http.listen),
            }
        }
    }
    Ok(())
}
