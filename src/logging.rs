//! Logging to stderr, shaped for wherever stderr goes:
//!
//! - a terminal: timestamped, coloured lines (no colour with `NO_COLOR` set);
//! - a file or pipe: the same lines without ANSI escapes;
//! - the systemd journal (`JOURNAL_STREAM` names our stderr): no timestamp
//!   (journald stamps every line) and a syslog priority prefix (`<3>` error,
//!   `<4>` warn, `<6>` info, `<7>` debug/trace) so `journalctl -p warning`
//!   filters by level;
//! - `log.format = "json"`: one JSON object per line (still prefixed with the
//!   priority in the journal; journald strips the prefix).
//!
//! The filter is `OUTPOST_LOG` (else `RUST_LOG`, else [`DEFAULT_FILTER`]) in
//! `tracing_subscriber::filter::Targets` syntax: `level` or `target=level`,
//! comma-separated. Unlike `EnvFilter` it has no span or field directives,
//! and links no regex engine.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{self, FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{Config, LogFormat};

/// Filter used when neither `OUTPOST_LOG` nor `RUST_LOG` is set (or valid).
pub const DEFAULT_FILTER: &str = "info,rumqttd=warn";

static JOURNAL: AtomicBool = AtomicBool::new(false);

/// Where log lines go and how they look; decided once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub format: LogFormat,
    /// stderr is the journal stream systemd set up for us.
    pub journal: bool,
    /// ANSI colours: stderr is a terminal and `NO_COLOR` is unset or empty.
    pub ansi: bool,
}

impl Settings {
    /// Reads the environment, stderr and the configured `log.format`.
    pub fn detect(format: LogFormat) -> Self {
        let journal = stderr_is_journal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Self { format, journal, ansi: !journal && !no_color && std::io::stderr().is_terminal() }
    }
}

/// Installs the global subscriber. `config` is the `--config` file, read only
/// for `log.format` (with `OUTPOST_LOG__FORMAT` overriding it, like every
/// key); a config that does not load falls back to text, and the command
/// that loads it properly reports why.
pub fn init(config: Option<&Path>) {
    let format = Config::load(config, std::env::vars()).map(|c| c.log.format).unwrap_or_default();
    let settings = Settings::detect(format);
    JOURNAL.store(settings.journal, Ordering::Relaxed);
    let filter = match filter_from_env() {
        Ok(f) => f,
        Err(message) => {
            eprintln!("{}outpost: {message}; using the default filter {DEFAULT_FILTER:?}", prefix(Level::WARN));
            default_filter()
        }
    };
    install(&settings, filter);
}

/// `<3>` when logging to the journal, else empty: for the few lines written
/// with `eprintln!` (e.g. the fatal error `main` prints before exiting), so
/// `journalctl -p err` shows them.
pub fn error_prefix() -> &'static str {
    prefix(Level::ERROR)
}

fn prefix(level: Level) -> &'static str {
    if JOURNAL.load(Ordering::Relaxed) { priority(level) } else { "" }
}

/// The syslog priority prefix journald understands (sd-daemon.h).
fn priority(level: Level) -> &'static str {
    match level {
        Level::ERROR => "<3>",
        Level::WARN => "<4>",
        Level::INFO => "<6>",
        Level::DEBUG | Level::TRACE => "<7>",
    }
}

fn default_filter() -> Targets {
    DEFAULT_FILTER.parse().unwrap_or_else(|_| Targets::new().with_default(Level::INFO))
}

/// `OUTPOST_LOG`, else `RUST_LOG`, else the default; an error names the
/// variable and what is wrong with it.
fn filter_from_env() -> Result<Targets, String> {
    for var in ["OUTPOST_LOG", "RUST_LOG"] {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => return parse_filter(var, &v),
            _ => {}
        }
    }
    Ok(default_filter())
}

fn parse_filter(var: &str, value: &str) -> Result<Targets, String> {
    value.trim().parse::<Targets>().map_err(|e| {
        format!(
            "{var}={value:?} is not a valid log filter ({e}); write `level` or `target=level` items separated \
             by commas, e.g. \"info,outpost::forward=debug\" (levels: error, warn, info, debug, trace, off)"
        )
    })
}

/// True when `JOURNAL_STREAM` (`<dev>:<inode>`, set by systemd for a unit
/// whose output goes to the journal) names the file our stderr is. A child
/// process that inherits the variable but writes stderr elsewhere does not
/// match, as systemd.exec(5) recommends.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd).metadata().is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

fn install(s: &Settings, filter: Targets) {
    let base = fmt::layer().with_writer(std::io::stderr).with_ansi(s.ansi);
    let layer = match (s.format, s.journal) {
        (LogFormat::Text, false) => base.boxed(),
        (LogFormat::Text, true) => base.event_format(Priority(fmt::format().without_time().with_ansi(false))).boxed(),
        (LogFormat::Json, false) => base.json().flatten_event(true).boxed(),
        (LogFormat::Json, true) => base.json().flatten_event(true).map_event_format(Priority).boxed(),
    };
    // Fails only if a subscriber is already installed (not in the binary).
    let _ = tracing_subscriber::registry().with(layer).with(filter).try_init();
}

/// Prefixes each event with its syslog priority.
struct Priority<F>(F);

impl<S, N, F> FormatEvent<S, N> for Priority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        writer.write_str(priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_in_targets_syntax_and_errors_name_the_variable() {
        let t = parse_filter("OUTPOST_LOG", DEFAULT_FILTER).unwrap();
        assert!(t.would_enable("outpost::app", &Level::INFO));
        assert!(!t.would_enable("outpost::app", &Level::DEBUG));
        assert!(!t.would_enable("rumqttd::router", &Level::INFO));
        assert!(t.would_enable("rumqttd::router", &Level::WARN));
        let err = parse_filter("RUST_LOG", "outpost=loud").unwrap_err();
        assert!(err.contains("RUST_LOG=\"outpost=loud\""), "{err}");
    }

    #[test]
    fn priorities_follow_syslog_levels() {
        assert_eq!(
            [Level::ERROR, Level::WARN, Level::INFO, Level::DEBUG, Level::TRACE].map(priority),
            ["<3>", "<4>", "<6>", "<7>", "<7>"]
        );
    }
}
