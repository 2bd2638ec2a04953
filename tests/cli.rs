//! The CLI as an installer uses it: config printing and checking, device and
//! token management, status, and a revoke that a running appliance honours.

mod common;

use std::time::Duration;

use common::{Proc, cli};
use serde_json::json;

#[test]
fn print_default_is_the_annotated_file_and_check_accepts_it() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, _) = cli(dir.path(), &["config", "print-default"]);
    assert!(ok);
    assert_eq!(out, outpost::config::DEFAULT_TOML);
    let f = dir.path().join("outpost.toml");
    std::fs::write(&f, &out).unwrap();
    let (ok, out, err) = cli(dir.path(), &["config", "check", f.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.starts_with("ok:"), "{out}");
}

#[test]
fn config_check_lists_every_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, "[limits]\nper_second = 0\nmax_batch = 0\n[log]\nmax_bytes = 5\n").unwrap();
    let (ok, _, err) = cli(dir.path(), &["config", "check", f.to_str().unwrap()]);
    assert!(!ok);
    for needle in ["limits.per_second", "limits.max_batch", "log.max_bytes"] {
        assert!(err.contains(needle), "{needle} not in: {err}");
    }
    std::fs::write(&f, "[http]\nlisen = \"x\"\n").unwrap();
    let (ok, _, err) = cli(dir.path(), &["config", "check", f.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("lisen"), "{err}");
}

#[test]
fn device_and_token_commands_manage_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, token, err) = cli(dir.path(), &["device", "add", "--tenant", "acme", "--id", "pump-1", "--name", "Pump"]);
    assert!(ok, "{err}");
    assert_eq!(token.trim().split('.').count(), 3, "a JWT on stdout: {token}");
    assert!(err.contains("shown once"));
    let (ok, _, err) = cli(dir.path(), &["device", "add", "--tenant", "acme", "--id", "pump-1"]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = cli(dir.path(), &["device", "add", "--tenant", "Bad", "--id", "x"]);
    assert!(!ok && err.contains("--tenant"), "{err}");
    let (ok, _, err) = cli(dir.path(), &["device", "add", "--tenant", "acme", "--id", "a/b"]);
    assert!(!ok && err.contains("--id"), "{err}");
    let (ok, out, _) = cli(dir.path(), &["device", "list"]);
    assert!(ok && out.contains("pump-1") && out.contains("Pump"), "{out}");
    let (ok, _, err) = cli(dir.path(), &["token", "issue", "--tenant", "acme", "--device", "nobody"]);
    assert!(!ok && err.contains("not registered"), "{err}");
    let (ok, t, err) = cli(
        dir.path(),
        &["token", "issue", "--tenant", "acme", "--device", "pump-1", "--ttl", "2h", "--perm", "read_events"],
    );
    assert!(ok, "{err}");
    assert_eq!(t.trim().split('.').count(), 3);
    let (ok, _, err) = cli(dir.path(), &["token", "issue", "--tenant", "acme", "--device", "pump-1", "--perm", "fly"]);
    assert!(!ok && err.contains("--perm"), "{err}");
    let (ok, _, err) = cli(dir.path(), &["token", "issue", "--admin", "--ttl", "5s"]);
    assert!(!ok && err.contains("--ttl"), "{err}");
    let (ok, out, _) = cli(dir.path(), &["device", "revoke", "pump-1"]);
    assert!(ok && out.contains("revoked"), "{out}");
    let (ok, _, err) = cli(dir.path(), &["token", "issue", "--tenant", "acme", "--device", "pump-1"]);
    assert!(!ok && err.contains("revoked"), "{err}");
    let (ok, out, _) = cli(dir.path(), &["status"]);
    assert!(ok);
    assert!(out.contains("devices         1 (1 revoked)"), "{out}");
    assert!(out.contains("not configured"), "{out}");
    let (ok, out, _) = cli(dir.path(), &["status", "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["devices"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_revoke_takes_effect_on_a_running_appliance() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, token, _) = cli(dir.path(), &["device", "add", "--tenant", "acme", "--id", "d1"]);
    assert!(ok);
    let token = token.trim().to_string();
    let proc = Proc::start(dir.path(), &[]);
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/realtime/acme/event", proc.base());
    let post = |client: reqwest::Client, url: String, token: String| async move {
        client
            .post(url)
            .bearer_auth(token)
            .json(&json!({"device_id": "d1", "event_type": "x", "payload": {}}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(post(client.clone(), url.clone(), token.clone()).await, 201);
    let (ok, _, err) = cli(dir.path(), &["device", "revoke", "d1"]);
    assert!(ok, "{err}");
    // Picked up within the registry poll interval (1 s); await it, no sleep.
    let revoked = common::eventually(Duration::from_secs(5), || {
        let (c, u, t) = (client.clone(), url.clone(), token.clone());
        async move { post(c, u, t).await == 401 }
    })
    .await;
    assert!(revoked, "revoked device still accepted after 5 s");
    assert_eq!(proc.terminate().code(), Some(0));
}

#[test]
fn run_refuses_a_bad_environment_override_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::bin())
        .arg("run")
        .env("OUTPOST_SITE__DATA_DIR", dir.path())
        .env("OUTPOST_HTTP__LISTEN", "not-an-address")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen"), "{err}");
}
