//! The TLS listeners (`http.tls_listen`, `mqtt.tls_listen`) with clients
//! nobody here wrote: curl (HTTPS, and a WebSocket upgrade over it) and
//! mosquitto_pub / mosquitto_sub (MQTT 3.1.1 and 5.0 over TLS). A client
//! trusting another CA is refused; SIGHUP swaps the certificate for new
//! connections while open ones stay up; a bad file at SIGHUP keeps the old
//! one, and a bad file at start stops the start naming it.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, add_device};

/// A CA and a server certificate for 127.0.0.1 / localhost it signed:
/// `<name>-ca.pem` / `.key`, `<name>-cert.pem` / `<name>-key.pem`.
fn pki(dir: &Path, name: &str) {
    let (ca, ca_key, subj) = (format!("{name}-ca.pem"), format!("{name}-ca.key"), format!("/CN={name} test CA"));
    openssl(
        dir,
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2",
        &["-subj", &subj, "-keyout", &ca_key, "-out", &ca],
    );
    signed(dir, name, name, "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1");
}

/// A key and a certificate for `subj`, signed by the CA of `pki(dir, ca)`
/// with the extension `ext`: `<file>-cert.pem` / `<file>-key.pem`.
fn signed(dir: &Path, ca: &str, file: &str, subj: &str, ext: &str) {
    let (cert, key, csr) = (format!("{file}-cert.pem"), format!("{file}-key.pem"), format!("{file}.csr"));
    let ext_file = format!("{file}.ext");
    std::fs::write(dir.join(&ext_file), format!("{ext}\n")).unwrap();
    openssl(
        dir,
        "req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes",
        &["-subj", subj, "-keyout", &key, "-out", &csr],
    );
    let (ca_cert, ca_key) = (format!("{ca}-ca.pem"), format!("{ca}-ca.key"));
    openssl(
        dir,
        "x509 -req -CAcreateserial -days 2",
        &["-in", &csr, "-CA", &ca_cert, "-CAkey", &ca_key, "-extfile", &ext_file, "-out", &cert],
    );
}

/// `openssl` with the words of `fixed`, then `args`, in `dir`.
fn openssl(dir: &Path, fixed: &str, args: &[&str]) {
    let out = Command::new("openssl").args(fixed.split_whitespace()).args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "openssl {fixed} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn curl(dir: &Path, ca: &str, url: &str) -> (bool, String) {
    let out =
        Command::new("curl").args(["-sS", "--max-time", "5", "--cacert", ca, url]).current_dir(dir).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn mosquitto_pub(dir: &Path, ca: &str, port: u16, token: &str, version: &str, body: &str) -> (bool, String) {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port.to_string(), "--cafile", ca, "-q", "1", "-V"])
        .args(version.split_whitespace())
        .args(["-i", "d1", "-u", "d1", "-P", token, "-t", "acme/devices/d1/events/tls.test", "-m", body])
        .current_dir(dir)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn sighup(app: &Proc) {
    let pid = i32::try_from(app.child.id()).unwrap();
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(pid, libc::SIGHUP) };
}

#[test]
fn https_wss_and_mqtts_with_real_clients_and_a_reload_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d, "one");
    pki(d, "two");
    std::fs::copy(d.join("one-cert.pem"), d.join("cert.pem")).unwrap();
    std::fs::copy(d.join("one-key.pem"), d.join("key.pem")).unwrap();
    let data = d.join("data");
    let token = add_device(&data, "acme", "d1");
    let reader = add_reader(&data);
    let (cert, key) = (d.join("cert.pem").display().to_string(), d.join("key.pem").display().to_string());
    let env = [
        ("OUTPOST_HTTP__TLS_LISTEN", "127.0.0.1:0"),
        ("OUTPOST_MQTT__TLS_LISTEN", "127.0.0.1:0"),
        ("OUTPOST_TLS__CERT_FILE", cert.as_str()),
        ("OUTPOST_TLS__KEY_FILE", key.as_str()),
    ];
    let app = Proc::start(&data, &env);
    let https = app.https.expect("https listening on … in the start line");
    let mqtts = app.mqtts.expect("mqtts listening on … in the start line").port();
    let url = |path: &str| format!("https://localhost:{}{path}", https.port());

    // HTTPS: the right CA is trusted, another CA's client refuses the server.
    let (ok, out) = curl(d, "one-ca.pem", &url("/healthz"));
    assert!(ok && out == "ok\n", "{out}");
    let (ok, out) = curl(d, "two-ca.pem", &url("/healthz"));
    assert!(!ok, "a client trusting another CA must refuse: {out}");

    // WSS: the stream endpoint upgrades over TLS.
    let out = Command::new("curl")
        .args(["-sS", "-i", "-N", "--http1.1", "--max-time", "2", "--cacert", "one-ca.pem"])
        .args(["-H", "Connection: Upgrade", "-H", "Upgrade: websocket", "-H", "Sec-WebSocket-Version: 13"])
        .args(["-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="])
        .arg(url(&format!("/api/v1/realtime/acme/stream?access_token={reader}")))
        .current_dir(d)
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout);
    assert!(head.starts_with("HTTP/1.1 101"), "WSS upgrade: {head}");

    // MQTT over TLS, 3.1.1 and 5.0; another CA is refused.
    for v in ["mqttv311", "mqttv5"] {
        let (ok, err) = mosquitto_pub(d, "one-ca.pem", mqtts, &token, v, r#"{"v":1}"#);
        assert!(ok, "{v}: {err}");
    }
    let (ok, _) = mosquitto_pub(d, "two-ca.pem", mqtts, &token, "mqttv311", r#"{"v":2}"#);
    assert!(!ok, "mosquitto_pub trusting another CA must fail");
    assert_eq!(common::log_rows(&data.join("site-log.sqlite")).len(), 2, "one event per accepted publish");

    // An MQTT-over-TLS subscriber opened before the reload…
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "localhost", "-p", &mqtts.to_string(), "--cafile", "one-ca.pem", "-V", "mqttv311", "-q", "1"])
        .args(["-i", "reader", "-u", "reader", "-P", &reader, "-t", "acme/events/#", "-C", "1", "-W", "30"])
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(until(Duration::from_secs(10), || presence_of(&app, &reader, "reader")), "the subscriber did not connect");

    // …SIGHUP with the second certificate: new handshakes get it at once.
    std::fs::copy(d.join("two-cert.pem"), d.join("cert.pem")).unwrap();
    std::fs::copy(d.join("two-key.pem"), d.join("key.pem")).unwrap();
    sighup(&app);
    assert!(until(Duration::from_secs(10), || curl(d, "two-ca.pem", &url("/healthz")).0), "reload not seen");
    assert!(!curl(d, "one-ca.pem", &url("/healthz")).0, "the old certificate is still served");
    // Retained, so the subscriber gets it even if its SUBSCRIBE lands after.
    let (ok, err) = mosquitto_pub(d, "two-ca.pem", mqtts, &token, "mqttv5 -r", r#"{"after":"reload"}"#);
    assert!(ok, "{err}");
    // The subscriber's connection from before the reload is still up and
    // gets the event published after it.
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success(), "mosquitto_sub: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(r#""after":"reload""#), "{:?}", out);

    // A broken file at SIGHUP keeps the certificate in use.
    std::fs::write(d.join("cert.pem"), "not a certificate\n").unwrap();
    sighup(&app);
    let logged = until(Duration::from_secs(10), || {
        app.stderr_tail.try_iter().any(|l| l.contains("TLS certificate NOT reloaded") && l.contains("tls.cert_file"))
    });
    assert!(logged, "the failed reload is logged with the file");
    assert!(curl(d, "two-ca.pem", &url("/healthz")).0, "the previous certificate must stay");
    drop(app);

    // A bad file at start stops the start and names it.
    let mut cmd = Command::new(common::bin());
    cmd.arg("run").env_remove("OUTPOST_CONFIG");
    for (k, v) in common::proc_env(&data).iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(env) {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls.cert_file") && err.contains("cert.pem"), "{err}");
}

/// Registers `reader`, a device allowed to read events (the WSS stream and
/// the MQTT subscriber); returns its token.
fn add_reader(data: &Path) -> String {
    let (ok, out, err) = common::cli(
        data,
        &["device", "add", "--tenant", "acme", "--id", "reader", "--perm", "read_events", "--perm", "write_events"],
    );
    assert!(ok, "{err}");
    out.trim().to_string()
}

/// `systemctl reload` on a box without TLS listeners: the SIGHUP is logged,
/// never the end of the process (its default action).
#[test]
fn sighup_without_tls_listeners_keeps_the_appliance_running() {
    let dir = tempfile::tempdir().unwrap();
    let app = Proc::start(dir.path(), &[]);
    sighup(&app);
    let logged =
        until(Duration::from_secs(10), || app.stderr_tail.try_iter().any(|l| l.contains("SIGHUP: nothing to reload")));
    assert!(logged, "the SIGHUP is logged");
    let out = Command::new("curl").args(["-sf", &format!("{}/healthz", app.base())]).output().unwrap();
    assert!(out.status.success(), "the appliance must still serve after SIGHUP");
}

/// `outpost doctor` checks the certificate as the start would.
#[test]
fn doctor_checks_the_tls_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d, "one");
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (cert, key) = (d.join("one-cert.pem").display().to_string(), d.join("one-key.pem").display().to_string());
    let env = [
        ("OUTPOST_HTTP__TLS_LISTEN", "127.0.0.1:0"),
        ("OUTPOST_TLS__CERT_FILE", cert.as_str()),
        ("OUTPOST_TLS__KEY_FILE", key.as_str()),
    ];
    let (_, out, _) = common::cli_env(&data, &["doctor"], &env);
    assert!(out.lines().any(|l| l.contains("tls") && l.contains("load and match")), "{out}");
    // A key of another certificate.
    pki(d, "two");
    let other = d.join("two-key.pem").display().to_string();
    let env = [env[0], env[1], ("OUTPOST_TLS__KEY_FILE", other.as_str())];
    let (ok, out, _) = common::cli_env(&data, &["doctor"], &env);
    assert!(!ok, "{out}");
    assert!(out.lines().any(|l| l.contains("do not belong together")), "{out}");
    // The devices' CA: a file with no certificate in it, named with its own fix.
    std::fs::write(d.join("no-ca.pem"), "not a certificate\n").unwrap();
    let ca = d.join("no-ca.pem").display().to_string();
    let env = [env[0], env[1], ("OUTPOST_TLS__KEY_FILE", key.as_str()), ("OUTPOST_TLS__CLIENT_CA_FILE", ca.as_str())];
    let (ok, out, _) = common::cli_env(&data, &["doctor"], &env);
    assert!(!ok, "{out}");
    let line = out.lines().find(|l| l.contains("tls.client_ca_file")).unwrap_or_default();
    assert!(line.contains("no PEM certificate") && line.contains("fix: point tls.client_ca_file"), "{out}");
}

/// TLS handshakes are connections: with `http.max_connections = 4`, forty
/// idle TCP connections to the HTTPS port (no handshake, no request) are
/// closed to make room, so a real client still gets in at once; and when
/// every connection is busy with a request, a new one is closed, never
/// answered in plaintext on a TLS socket.
#[test]
fn https_handshakes_count_against_the_connection_cap_and_refusals_are_never_plaintext() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d, "one");
    let data = d.join("data");
    let token = add_reader(&data);
    let (cert, key) = (d.join("one-cert.pem").display().to_string(), d.join("one-key.pem").display().to_string());
    let env = [
        ("OUTPOST_HTTP__TLS_LISTEN", "127.0.0.1:0"),
        ("OUTPOST_TLS__CERT_FILE", cert.as_str()),
        ("OUTPOST_TLS__KEY_FILE", key.as_str()),
        ("OUTPOST_HTTP__MAX_CONNECTIONS", "4"),
    ];
    let app = Proc::start(&data, &env);
    let https = app.https.expect("https listening on … in the start line");
    let url = |path: &str| format!("https://localhost:{}{path}", https.port());
    let idle: Vec<std::net::TcpStream> = (0..40).map(|_| std::net::TcpStream::connect(https).unwrap()).collect();
    let started = Instant::now();
    let (ok, out) = curl(d, "one-ca.pem", &url("/healthz"));
    assert!(ok && out == "ok\n", "a client behind 40 idle TLS connections: {out}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    // The idle handshakes were closed to make room, not held.
    let closed = idle
        .iter()
        .filter(|c| {
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            matches!((&mut &**c).read(&mut [0u8; 16]), Ok(0) | Err(_))
        })
        .count();
    assert!(closed >= 36, "{closed} of 40 idle TLS connections closed (cap 4)");
    drop(idle);

    // Four long-polls keep every connection busy.
    let polls: Vec<_> = (0..4)
        .map(|_| {
            Command::new("curl")
                .args(["-sS", "--max-time", "20", "--cacert", "one-ca.pem", "-H"])
                .arg(format!("Authorization: Bearer {token}"))
                .arg(url("/api/v1/realtime/acme/poll?timeout=15"))
                .current_dir(d)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let polling = until(Duration::from_secs(10), || {
        let m = Command::new("curl").args(["-sS", &format!("{}/metrics", app.base())]).output().unwrap();
        String::from_utf8_lossy(&m.stdout).contains("outpost_stream_subscribers{kind=\"poll\"} 4")
    });
    assert!(polling, "the four long-polls never held their connections");
    // Every connection is busy: a new one (whatever it sends) is closed,
    // with no plaintext answer on the TLS socket, and a real client fails.
    let mut c = std::net::TcpStream::connect(https).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    assert!(
        got.is_empty(),
        "an answer on the TLS port while every connection is busy: {:?}",
        String::from_utf8_lossy(&got)
    );
    let (ok, out) = curl(d, "one-ca.pem", &url("/healthz"));
    assert!(!ok, "{out}");
    for mut p in polls {
        let _ = p.kill();
        let _ = p.wait();
    }
    let _ = token;
}

/// A client certificate for `cn` (`<tenant>/<device id>`) signed by the CA
/// of `pki(dir, ca)`, as `<file>-cert.pem` / `<file>-key.pem`.
fn client_cert(dir: &Path, ca: &str, file: &str, cn: &str) {
    // A "/" inside the CN is escaped: -subj splits on it.
    let subj = format!("/CN={}", cn.replace('/', "\\/"));
    signed(dir, ca, file, &subj, "extendedKeyUsage=clientAuth");
}

/// mosquitto_pub over TLS with the client certificate `<file>-cert.pem`
/// and no username or password; true when the publish was acked.
fn publish_with_cert(dir: &Path, port: u16, file: &str, version: &str, topic: &str) -> (bool, String) {
    let (cert, key) = (format!("{file}-cert.pem"), format!("{file}-key.pem"));
    let out = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port.to_string(), "--cafile", "one-ca.pem", "--cert", &cert, "--key", &key])
        .args(["-q", "1", "-V", version, "-i", "d1", "-t", topic, "-m", r#"{"by":"certificate"}"#])
        .current_dir(dir)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `tls.client_ca_file`: a device logs in with a certificate of that CA
/// (its CN names the device) over MQTT (3.1.1 and 5.0, mosquitto) and
/// HTTPS (curl), with no token or secret; a certificate of another CA is
/// refused at the handshake, one that names no device or another device
/// than the username at CONNECT; tokens still work beside certificates; a
/// revoked device's certificate no longer logs in, and its open session
/// ends.
#[test]
fn devices_log_in_with_a_client_certificate_of_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d, "one"); // the server's certificate
    pki(d, "dev"); // the CA of device certificates
    pki(d, "rogue"); // another CA
    client_cert(d, "dev", "d1", "acme/d1");
    client_cert(d, "dev", "d2", "acme/d2");
    client_cert(d, "dev", "nameless", "d1");
    client_cert(d, "rogue", "rogue", "acme/d1");
    let data = d.join("data");
    let token = add_device(&data, "acme", "d1");
    add_device(&data, "acme", "d2");
    let path = |f: &str| d.join(f).display().to_string();
    let (cert, key, ca) = (path("one-cert.pem"), path("one-key.pem"), path("dev-ca.pem"));
    let env = [
        ("OUTPOST_HTTP__TLS_LISTEN", "127.0.0.1:0"),
        ("OUTPOST_MQTT__TLS_LISTEN", "127.0.0.1:0"),
        ("OUTPOST_TLS__CERT_FILE", cert.as_str()),
        ("OUTPOST_TLS__KEY_FILE", key.as_str()),
        ("OUTPOST_TLS__CLIENT_CA_FILE", ca.as_str()),
    ];
    let app = Proc::start(&data, &env);
    let https = app.https.expect("https listening").port();
    let mqtts = app.mqtts.expect("mqtts listening").port();
    let topic = "acme/devices/d1/events/cert.test";

    for v in ["mqttv311", "mqttv5"] {
        let (ok, err) = publish_with_cert(d, mqtts, "d1", v, topic);
        assert!(ok, "{v} with acme/d1's certificate: {err}");
    }
    let (ok, _) = publish_with_cert(d, mqtts, "rogue", "mqttv311", topic);
    assert!(!ok, "a certificate of another CA must be refused");
    let (ok, err) = publish_with_cert(d, mqtts, "nameless", "mqttv5", topic);
    assert!(!ok, "a CN without the tenant names no device");
    assert!(err.to_lowercase().contains("bad user name or password"), "{err}");
    // Tokens keep working on the same listener, without a certificate.
    let (ok, err) = mosquitto_pub(d, "one-ca.pem", mqtts, &token, "mqttv311", r#"{"by":"token"}"#);
    assert!(ok, "a token beside client certificates: {err}");
    // A username naming another device than the certificate's is refused.
    let out = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &mqtts.to_string(), "--cafile", "one-ca.pem"])
        .args(["--cert", "d1-cert.pem", "--key", "d1-key.pem", "-q", "1", "-V", "mqttv5", "-i", "d2", "-u", "d2"])
        .args(["-t", "acme/devices/d2/events/cert.test", "-m", "{}"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(!out.status.success(), "d1's certificate logging in as d2");

    // HTTPS: the certificate is the credential; another CA's fails the handshake.
    let post = |file: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert", "one-ca.pem"])
            .args(["--cert", &format!("{file}-cert.pem"), "--key", &format!("{file}-key.pem")])
            .args([
                "-H",
                "Content-Type: application/json",
                "-d",
                r#"{"device_id":"d1","event_type":"cert.http","payload":{}}"#,
            ])
            .args(["-w", "%{http_code}", "-o", "/dev/null"])
            .arg(format!("https://localhost:{https}/api/v1/realtime/acme/event"))
            .current_dir(d)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let (ok, code) = post("d1");
    assert!(ok && code.starts_with("20"), "HTTPS with acme/d1's certificate: {code}");
    let (ok, _) = post("rogue");
    assert!(!ok, "HTTPS with another CA's certificate must fail");

    let rows = common::log_rows(&data.join("site-log.sqlite"));
    assert_eq!(rows.len(), 4, "two MQTT publishes, one with a token, one HTTPS post: {rows:?}");

    // d2 connected with its certificate, then revoked: the session ends
    // and the certificate logs in no more.
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "localhost", "-p", &mqtts.to_string(), "--cafile", "one-ca.pem"])
        .args(["--cert", "d2-cert.pem", "--key", "d2-key.pem", "-V", "mqttv5", "-i", "d2", "-q", "1"])
        .args(["-t", "acme/devices/d2/#", "-W", "60"])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sub = Guard(sub);
    assert!(until(Duration::from_secs(10), || presence_of(&app, &token, "d2")), "d2 did not connect");
    let (ok, _, err) = common::cli(&data, &["device", "revoke", "d2", "--tenant", "acme"]);
    assert!(ok, "{err}");
    let ended = until(Duration::from_secs(5), || sub.0.try_wait().unwrap().is_some());
    assert!(ended, "the revoked device's certificate session must end");
    let (ok, _) = publish_with_cert(d, mqtts, "d2", "mqttv311", "acme/devices/d2/events/cert.test");
    assert!(!ok, "a revoked device's certificate must not log in");
}

/// Kills the child when dropped (a failed assertion leaves no process).
struct Guard(std::process::Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `device` holds an MQTT session (its TLS handshake and CONNECT
/// are done), as the presence API says.
fn presence_of(app: &Proc, token: &str, device: &str) -> bool {
    let out = Command::new("curl")
        .args(["-s", "-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("{}/api/v1/realtime/acme/presence", app.base()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains(&format!(r#""device_id":"{device}""#))
}
