//! Command line: run, migrate, config, device, token, status, bench.
//! Commands other than `run` and `bench` work on the site log file directly,
//! so they also work while the appliance is stopped; a running appliance
//! picks up device changes within a second.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::auth::{Authenticator, Perm, Registry};
use crate::config::{Config, DEFAULT_TOML};
use crate::event::{now_us, valid_tenant};
use crate::http::api::{check_device_id, parse_perms, parse_ttl};
use crate::log::{self, schema};

/// outpost: durable event ingest for edge sites.
#[derive(Parser, Debug)]
#[command(name = "outpost", version, about, propagate_version = true)]
pub struct Cli {
    /// Config file (TOML). Without one, built-in defaults apply;
    /// OUTPOST_<SECTION>__<KEY> environment variables override either.
    #[arg(long, short, global = true, env = "OUTPOST_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the appliance until SIGTERM / SIGINT.
    Run,
    /// Create or upgrade the site log schema, then exit.
    Migrate,
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
    /// Load generators for a running appliance (not tests: report numbers).
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
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
        #[command(flatten)]
        token: TokenArgs,
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
    let load = |path: Option<&std::path::Path>| {
        Config::load(path, std::env::vars()).map_err(anyhow::Error::from)
    };
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
        Command::Bench(b) => crate::bench::run(b, load(cli.config.as_deref())?).await,
        Command::Migrate => {
            let cfg = load(cli.config.as_deref())?;
            std::fs::create_dir_all(&cfg.site.data_dir)
                .with_context(|| format!("cannot create {}", cfg.site.data_dir.display()))?;
            log::open_and_migrate(&cfg.log_path())?;
            println!("site log {} is up to date", cfg.log_path().display());
            Ok(())
        }
        Command::Device(cmd) => device(cmd, &load(cli.config.as_deref())?),
        Command::Token(cmd) => token(cmd, &load(cli.config.as_deref())?),
        Command::Status { json } => status(&load(cli.config.as_deref())?, json),
    }
}

fn open_log(cfg: &Config) -> anyhow::Result<rusqlite::Connection> {
    std::fs::create_dir_all(&cfg.site.data_dir)
        .with_context(|| format!("cannot create {}", cfg.site.data_dir.display()))?;
    log::open_and_migrate(&cfg.log_path())
        .with_context(|| format!("cannot open {}", cfg.log_path().display()))
}

fn authenticator(cfg: &Config) -> anyhow::Result<Authenticator> {
    let (a, created) = Authenticator::from_config(cfg, Arc::new(Registry::default()))?;
    if created {
        eprintln!(
            "created token signing secret {}",
            cfg.secret_path().display()
        );
    }
    Ok(a)
}

fn token_options(args: &TokenArgs) -> anyhow::Result<(Vec<Perm>, Option<Duration>)> {
    let perms = if args.perms.is_empty() {
        Perm::DEFAULT.to_vec()
    } else {
        parse_perms(&args.perms).map_err(|e| anyhow::anyhow!("--perm: {}", e.message))?
    };
    let ttl = args
        .ttl
        .as_deref()
        .map(parse_ttl)
        .transpose()
        .map_err(|m| anyhow::anyhow!("--ttl: {m}"))?;
    Ok((perms, ttl))
}

fn check_tenant_arg(tenant: &str) -> anyhow::Result<()> {
    if !valid_tenant(tenant) {
        bail!("--tenant {tenant:?}: must match ^[a-z][a-z0-9_]{{0,40}}$");
    }
    Ok(())
}

fn device(cmd: DeviceCommand, cfg: &Config) -> anyhow::Result<()> {
    let conn = open_log(cfg)?;
    match cmd {
        DeviceCommand::Add {
            tenant,
            id,
            name,
            token,
        } => {
            check_tenant_arg(&tenant)?;
            let id = id.unwrap_or_else(|| {
                format!("dev-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
            });
            check_device_id(&id).map_err(|e| anyhow::anyhow!("--id {id:?}: {}", e.message))?;
            let (perms, ttl) = token_options(&token)?;
            let auth = authenticator(cfg)?;
            let d = schema::add_device(&conn, &tenant, &id, name.as_deref(), now_us())?;
            let t = auth.issue_device(&tenant, &id, &perms, ttl)?;
            eprintln!(
                "registered device {}/{} — its token (shown once):",
                d.tenant, d.device_id
            );
            println!("{t}");
            Ok(())
        }
        DeviceCommand::List { tenant } => {
            let devices = schema::devices(&conn, tenant.as_deref())?;
            println!(
                "{:<16} {:<32} {:<8} {:>10}  {:<25}  name",
                "tenant", "device", "state", "events", "last seen"
            );
            for d in &devices {
                println!(
                    "{:<16} {:<32} {:<8} {:>10}  {:<25}  {}",
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
                    d.name.as_deref().unwrap_or("")
                );
            }
            eprintln!("{} device(s)", devices.len());
            Ok(())
        }
        DeviceCommand::Revoke { id, tenant } => {
            let tenant = match tenant {
                Some(t) => t,
                None => {
                    let matches: Vec<_> = schema::devices(&conn, None)?
                        .into_iter()
                        .filter(|d| d.device_id == id)
                        .collect();
                    match matches.as_slice() {
                        [one] => one.tenant.clone(),
                        [] => bail!("no device {id:?} in any tenant"),
                        _ => bail!("device {id:?} exists in several tenants; pass --tenant"),
                    }
                }
            };
            let d = schema::revoke_device(&conn, &tenant, &id, now_us())?;
            println!(
                "revoked {}/{}; its tokens no longer work",
                d.tenant, d.device_id
            );
            Ok(())
        }
    }
}

fn token(cmd: TokenCommand, cfg: &Config) -> anyhow::Result<()> {
    let TokenCommand::Issue {
        tenant,
        device,
        admin,
        token,
    } = cmd;
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
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn status(cfg: &Config, json: bool) -> anyhow::Result<()> {
    if !cfg.log_path().exists() {
        bail!(
            "no site log at {} (has the appliance run with this config?)",
            cfg.log_path().display()
        );
    }
    let conn = log::open(&cfg.log_path(), true)?;
    let s = schema::status(&conn, now_us())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("site            {}", cfg.site_id());
    println!(
        "log             {} ({:.1} MiB)",
        cfg.log_path().display(),
        s.log_bytes as f64 / 1048576.0
    );
    println!("events          {} (last seq {})", s.total_rows, s.last_seq);
    println!("backlog         {} waiting to forward", s.backlog_rows);
    println!(
        "oldest pending  {}",
        s.oldest_pending_age_seconds
            .map_or("none".into(), |a| format!("{a:.0} s ago"))
    );
    println!(
        "devices         {} ({} revoked)",
        s.devices, s.devices_revoked
    );
    println!(
        "central         {}",
        cfg.central
            .url
            .as_deref()
            .map_or("not configured (buffering only)".to_string(), redact_url)
    );
    Ok(())
}

/// A URL with any password replaced, for printing.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..s + 3], user, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
