//! Log output of the real binary with stderr written to a file, the way
//! systemd (journal) or a shell redirect sees it: no ANSI escapes off a
//! terminal, syslog priority prefixes and no timestamps in the journal, one
//! JSON object per line with `log.format = "json"`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_outpost"))
}

/// `outpost <args>` on a temp data dir with loopback ports, stderr written
/// to `log`; the caller's logging environment is removed so only `env` counts.
fn command(dir: &Path, log: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null());
    cmd.stderr(std::fs::File::create(log).expect("create log file"));
    for (k, _) in std::env::vars() {
        if k.starts_with("OUTPOST_") || ["NO_COLOR", "JOURNAL_STREAM", "RUST_LOG"].contains(&k.as_str()) {
            cmd.env_remove(k);
        }
    }
    cmd.env("OUTPOST_SITE__DATA_DIR", dir.join("data"))
        .env("OUTPOST_SITE__ID", "site-log")
        .env("OUTPOST_HTTP__LISTEN", "127.0.0.1:0")
        .env("OUTPOST_MQTT__LISTEN", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs the appliance until it has logged that it listens, stops it with
/// SIGTERM and returns everything it wrote to stderr.
fn run_appliance(dir: &Path, log: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all_args = args.to_vec();
    all_args.push("run");
    let mut child = command(dir, log, &all_args, env).spawn().expect("start outpost");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("http listening on") {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("outpost exited ({status}) before listening; its log:\n{text}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("outpost did not log `http listening on` within 30 s; its log:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = i32::try_from(child.id()).expect("pid fits i32");
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.wait().expect("wait for outpost");
    let text = std::fs::read_to_string(log).expect("read log");
    assert!(status.success(), "outpost exited with {status} after SIGTERM; its log:\n{text}");
    assert!(text.contains("stopped cleanly"), "{text}");
    text
}

/// `JOURNAL_STREAM` naming `file`, as systemd sets it for a unit whose
/// stderr is the journal socket.
fn journal_stream(file: &Path) -> String {
    let m = std::fs::metadata(file).expect("stat log file");
    format!("{}:{}", m.dev(), m.ino())
}

/// True when `line` holds an RFC 3339 date-time (`2026-01-31T…`).
fn has_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    b.windows(11).any(|w| {
        w[..4].iter().all(u8::is_ascii_digit)
            && w[4] == b'-'
            && w[5..7].iter().all(u8::is_ascii_digit)
            && w[7] == b'-'
            && w[8..10].iter().all(u8::is_ascii_digit)
            && w[10] == b'T'
    })
}

#[test]
fn a_log_written_to_a_file_has_no_escape_codes_but_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("outpost.log");
    // An inherited JOURNAL_STREAM that names another file must not switch to
    // journal mode (systemd.exec(5): compare it with stderr).
    let text = run_appliance(dir.path(), &log, &[], &[("JOURNAL_STREAM", "1:1")]);
    assert!(!text.contains('\x1b'), "ANSI escape in a file-written log:\n{text:?}");
    assert!(text.lines().count() >= 2, "{text}");
    for line in text.lines() {
        assert!(has_timestamp(line) && !line.starts_with('<'), "expected a timestamped line: {line:?}");
    }
}

#[test]
fn under_journald_lines_carry_priorities_and_no_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("journal.log");
    std::fs::File::create(&log).unwrap();
    let stream = journal_stream(&log);
    let text = run_appliance(dir.path(), &log, &[], &[("JOURNAL_STREAM", &stream)]);
    assert!(!text.contains('\x1b'), "{text:?}");
    let listening = text.lines().find(|l| l.contains("http listening on")).unwrap();
    assert!(listening.starts_with("<6>"), "info line without <6>: {listening:?}");
    for line in text.lines() {
        assert!(
            ["<3>", "<4>", "<6>", "<7>"].iter().any(|p| line.starts_with(p)),
            "line without a syslog priority: {line:?}"
        );
        assert!(!has_timestamp(line), "timestamp in a journal line: {line:?}");
    }

    // A bad filter is reported as a warning (and the default filter used);
    // a fatal error is reported at priority 3, so `journalctl -p err` has it.
    let out = command(
        dir.path(),
        &log,
        &["run"],
        &[
            ("JOURNAL_STREAM", &journal_stream(&log)),
            ("OUTPOST_LOG", "outpost=loud"),
            ("OUTPOST_LIMITS__PER_SECOND", "0"),
        ],
    )
    .status()
    .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!out.success(), "{text}");
    let mut lines = text.lines();
    let warn = lines.next().unwrap_or_default();
    assert!(warn.starts_with("<4>") && warn.contains("OUTPOST_LOG=\"outpost=loud\""), "{text}");
    let fatal = lines.next().unwrap_or_default();
    assert!(fatal.starts_with("<3>outpost: invalid configuration"), "{text}");
    assert!(text.contains("limits.per_second"), "{text}");
}

#[test]
fn json_format_gives_one_parseable_object_per_line_from_env_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str| {
        assert!(text.lines().count() >= 2, "{text}");
        for line in text.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
            assert!(v["timestamp"].is_string() && v["level"].is_string() && v["target"].is_string(), "{line}");
            assert!(v["message"].is_string(), "{line}");
        }
        let up = text.lines().find(|l| l.contains("http listening on")).unwrap();
        let v: serde_json::Value = serde_json::from_str(up).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["site_id"], "site-log", "fields are top-level keys: {up}");
    };
    let log = dir.path().join("env.log");
    check(&run_appliance(dir.path(), &log, &[], &[("OUTPOST_LOG__FORMAT", "json")]));

    let config = dir.path().join("outpost.toml");
    std::fs::write(&config, "[log]\nformat = \"json\"\n").unwrap();
    let log = dir.path().join("file.log");
    check(&run_appliance(dir.path(), &log, &["--config", config.to_str().unwrap()], &[]));

    // In the journal, each JSON line carries its priority (journald strips it).
    let log = dir.path().join("journal.json.log");
    std::fs::File::create(&log).unwrap();
    let stream = journal_stream(&log);
    let text = run_appliance(dir.path(), &log, &[], &[("OUTPOST_LOG__FORMAT", "json"), ("JOURNAL_STREAM", &stream)]);
    let stripped: String = text
        .lines()
        .map(|l| {
            let json = l.strip_prefix("<6>").unwrap_or_else(|| panic!("info JSON line without <6>: {l:?}"));
            format!("{json}\n")
        })
        .collect();
    check(&stripped);
}
