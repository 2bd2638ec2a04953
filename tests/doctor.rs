//! `outpost doctor` against real directories, sockets, a running appliance
//! and a real PostgreSQL with TLS: exit 0 when all is well (warnings
//! allowed), non-zero with the fix text when a check fails.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::pg::Pg;
use common::{Proc, add_device, cli_env};

fn doctor(dir: &std::path::Path, env: &[(&str, &str)]) -> (bool, String, String) {
    cli_env(dir, &["doctor"], env)
}

/// A data dir as the package or systemd (StateDirectoryMode=0700) makes it.
fn data_dir(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    data
}

fn line<'a>(out: &'a str, needle: &str) -> &'a str {
    out.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no line with {needle:?} in:\n{out}"))
}

#[test]
fn a_good_installation_passes_and_a_bad_data_dir_fails_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(&dir);
    let (ok, out, err) = doctor(&data, &[]);
    assert!(ok, "doctor failed on a good installation:\n{out}\n{err}");
    assert!(line(&out, "config").starts_with("ok"), "{out}");
    assert!(line(&out, "data dir").starts_with("ok"), "{out}");
    assert!(line(&out, "disk").starts_with("ok") || line(&out, "disk").starts_with("warn"), "{out}");
    assert!(line(&out, "http.listen").starts_with("ok"), "{out}");
    assert!(out.contains("doctor: all checks passed"), "{out}");
    for l in out.lines().filter(|l| l.starts_with("warn") || l.starts_with("FAIL")) {
        assert!(l.contains(" — fix: "), "a problem without a fix: {l}");
    }

    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ok, out, err) = doctor(&data, &[]);
    assert!(!ok, "a world-readable data dir passed:\n{out}");
    let l = line(&out, "has mode 0755");
    assert!(l.starts_with("FAIL"), "{l}");
    assert!(l.contains(&format!("fix: chmod 0700 {}", data.display())), "{l}");
    assert!(err.contains("1 check(s) failed"), "{err}");

    // A signing secret others can read.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let secret = data.join("jwt.secret");
    std::fs::write(&secret, "x".repeat(64)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, out, _) = doctor(&data, &[]);
    assert!(!ok, "{out}");
    assert!(line(&out, "jwt.secret").contains(&format!("fix: chmod 0600 {}", secret.display())), "{out}");

    // A broken config: FAIL, and how to list every problem.
    let (ok, out, _) = doctor(&data, &[("OUTPOST_LIMITS__PER_SECOND", "0")]);
    assert!(!ok);
    let l = line(&out, "config");
    assert!(l.starts_with("FAIL") && l.contains("limits.per_second") && l.contains("outpost config check"), "{l}");
}

#[test]
fn a_port_taken_by_another_program_fails_but_one_held_by_the_running_outpost_is_fine() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(&dir);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (ok, out, _) = doctor(&data, &[("OUTPOST_MQTT__LISTEN", &addr)]);
    assert!(!ok, "a taken port passed:\n{out}");
    let l = line(&out, "mqtt.listen");
    assert!(l.starts_with("FAIL") && l.contains("in use by another program"), "{l}");
    assert!(l.contains("fix: stop it") && l.contains("or change mqtt.listen"), "{l}");
    drop(taken);

    let app = Proc::start(&data, &[]);
    let http = app.addr.to_string();
    let mqtt = app.mqtt.expect("mqtt address").to_string();
    let (ok, out, err) = doctor(&data, &[("OUTPOST_HTTP__LISTEN", &http), ("OUTPOST_MQTT__LISTEN", &mqtt)]);
    assert!(ok, "{out}\n{err}");
    for key in ["http.listen", "mqtt.listen"] {
        let l = line(&out, key);
        assert!(l.starts_with("ok") && l.contains("in use by the running outpost (site site-a)"), "{l}");
    }
    // The running appliance made its data dir and secret with the right modes.
    assert!(line(&out, "data dir").starts_with("ok"), "{out}");
    assert!(line(&out, "jwt.secret").starts_with("ok"), "{out}");
    assert!(app.terminate().success());
}

/// The zero-config path (`make run`): `outpost run` in an empty directory
/// makes `./data` itself, and its own doctor finds nothing to fail there.
#[test]
fn a_first_start_in_an_empty_directory_leaves_nothing_the_doctor_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(common::bin());
    cmd.current_dir(dir.path())
        .env_remove("OUTPOST_SITE__DATA_DIR")
        .env("OUTPOST_HTTP__LISTEN", "127.0.0.1:0")
        .env("OUTPOST_MQTT__LISTEN", "127.0.0.1:0")
        .env("OUTPOST_LOG", "info")
        .env("NO_COLOR", "1");
    let app = Proc::spawn(cmd);
    assert!(app.terminate().success());

    let data = dir.path().join("data");
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "the first start made ./data with mode {mode:04o}");
    let out = std::process::Command::new(common::bin())
        .arg("doctor")
        .current_dir(dir.path())
        .env_remove("OUTPOST_CONFIG")
        .env_remove("OUTPOST_SITE__DATA_DIR")
        .env("OUTPOST_HTTP__LISTEN", "127.0.0.1:0")
        .env("OUTPOST_MQTT__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.lines().any(|l| l.starts_with("FAIL")), "{stdout}");
    assert!(line(&stdout, "data dir").starts_with("ok"), "{stdout}");
    assert!(line(&stdout, "jwt.secret").starts_with("ok"), "{stdout}");

    // The CLI's first use (before any start) makes the same directory.
    let other = tempfile::tempdir().unwrap();
    let data = other.path().join("nested").join("data");
    add_device(&data, "acme", "pump-1");
    for d in [other.path().join("nested"), data] {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "{} made with mode {mode:04o}", d.display());
    }
}

#[test]
fn central_checks_use_the_forwarders_connector_tls_and_schema_rights() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(&dir);
    let (pg, ca) = Pg::start_tls();
    let url = pg.url();
    let ca = ca.display().to_string();
    let tls = [("OUTPOST_CENTRAL__URL", url.as_str()), ("OUTPOST_CENTRAL__TLS", "require")];

    let mut env = tls.to_vec();
    env.push(("OUTPOST_CENTRAL__CA_FILE", ca.as_str()));
    let (ok, out, err) = doctor(&data, &env);
    assert!(ok, "{out}\n{err}");
    assert!(line(&out, "reachable").starts_with("ok"), "{out}");
    assert!(line(&out, "certificate verified").starts_with("ok"), "{out}");
    assert!(line(&out, "may create tenant schemas").starts_with("ok"), "{out}");

    // The system CAs do not know the server's CA: the handshake is refused.
    let (ok, out, _) = doctor(&data, &tls);
    assert!(!ok, "{out}");
    let l = line(&out, "central ");
    assert!(l.starts_with("FAIL") && l.contains("fix: set central.ca_file"), "{l}");

    // A role without CREATE on the database, with migrate on.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(pg.exec("CREATE ROLE weak LOGIN"));
    let weak = url.replace("postgres@", "weak@");
    let env = [
        ("OUTPOST_CENTRAL__URL", weak.as_str()),
        ("OUTPOST_CENTRAL__TLS", "require"),
        ("OUTPOST_CENTRAL__CA_FILE", ca.as_str()),
    ];
    let (ok, out, _) = doctor(&data, &env);
    assert!(!ok, "{out}");
    let l = line(&out, "may not create schemas");
    assert!(l.starts_with("FAIL") && l.contains("fix: GRANT CREATE ON DATABASE postgres TO weak"), "{l}");

    // Nothing listening: unreachable, with the network fix.
    pg.kill();
    let (ok, out, _) = doctor(&data, &[("OUTPOST_CENTRAL__URL", url.as_str()), ("OUTPOST_CENTRAL__TLS", "disable")]);
    assert!(!ok, "{out}");
    let l = line(&out, "central ");
    assert!(l.starts_with("FAIL") && l.contains("fix: check that the host and port"), "{l}");
}
