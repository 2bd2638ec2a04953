//! The MQTT front-end of a real in-process appliance (`app::start`: real
//! decoder, ACL, ingest submit, site log on tmpfs) fed a byte stream after a
//! valid CONNECT, over an in-memory duplex stream (`Running::serve_mqtt`:
//! the session code the TCP listener runs, without the socket, so a run
//! makes tens of millions of sessions instead of one per millisecond).
//!
//! An input starting with `U` is an MQTT 5.0 session (5.0 CONNECT), any
//! other a 3.1.1 one.
//!
//! Once per process: a data dir under /dev/shm with a registered device
//! `acme/d1`, the appliance on 127.0.0.1:0 with raised rate limits, and a
//! token. Per input: a session on a fresh duplex stream; the client half
//! sends CONNECT + the input, half-closes and reads until the server closes
//! (a session still open 2 s after the client's EOF is dropped and counted
//! as a hang). Every 1,024 inputs, and after a hang, a fresh CONNECT over
//! real TCP must get CONNACK 0 and `/healthz` must answer: a stage that died
//! fails the run. Any panic in any appliance thread aborts the process
//! (libFuzzer's panic hook), so it is reported as a crash.
#![no_main]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use outpost::auth::{Authenticator, Perm, Registry};
use outpost::config::Config;

struct App {
    rt: tokio::runtime::Runtime,
    running: outpost::app::Running,
    mqtt: SocketAddr,
    http: SocketAddr,
    connect: Vec<u8>,
    connect5: Vec<u8>,
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// CONNECT, MQTT 3.1.1 (or 5.0, with no properties), clean session,
/// username `d1`, the token as password.
fn connect_packet(token: &str, v5: bool) -> Vec<u8> {
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.push(if v5 { 5 } else { 4 });
    body.push(0b1100_0010);
    body.extend_from_slice(&30u16.to_be_bytes());
    if v5 {
        body.push(0); // property length
    }
    string(b"d1", &mut body);
    string(b"d1", &mut body);
    string(token.as_bytes(), &mut body);
    let mut out = vec![0x10];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&body);
    out
}

fn app() -> &'static App {
    static APP: OnceLock<App> = OnceLock::new();
    APP.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        let dir = base.join(format!("outpost-fuzz-mqtt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("data dir");
        let mut config = Config::default();
        config.site.id = Some("site-a".into());
        config.site.data_dir = dir.clone();
        config.http.listen = "127.0.0.1:0".parse().expect("addr");
        config.mqtt.listen = "127.0.0.1:0".parse().expect("addr");
        config.limits.per_second = 1_000_000_000;
        config.limits.per_minute = 1_000_000_000;
        config.limits.per_hour = 1_000_000_000;
        config.mqtt.connect_timeout = Duration::from_secs(2);
        // One device connects for every input: far past the reconnect-loop
        // limit (mqtt.max_connects_per_minute), which is not under test here.
        config.mqtt.max_connects_per_minute = 0;
        config.validate().expect("config");

        // Register the device in the site log, the way `outpost device add` does.
        let conn = outpost::log::open_and_migrate(&config.log_path()).expect("site log");
        outpost::log::schema::add_device(&conn, "acme", "d1", None, &Default::default(), outpost::event::now_us()).expect("add device");
        drop(conn);
        let issuer = Authenticator::from_config(&config, std::sync::Arc::new(Registry::default())).expect("keys").0;
        let token = issuer.issue_device("acme", "d1", &[Perm::WriteEvents, Perm::ReadEvents], None).expect("token");

        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let running = rt.block_on(outpost::app::start(config)).expect("appliance starts");
        let app = App {
            mqtt: running.mqtt_addr.expect("mqtt enabled"),
            http: running.http_addr,
            running,
            rt,
            connect: connect_packet(&token, false),
            connect5: connect_packet(&token, true),
        };
        alive(&app);
        app
    })
}

/// A fresh CONNECT gets CONNACK 0 and `/healthz` answers 200, within 5 s.
fn alive(app: &App) {
    let deadline = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&app.mqtt, deadline).expect("MQTT port accepts");
    s.set_read_timeout(Some(deadline)).expect("timeout");
    s.write_all(&app.connect).expect("send CONNECT");
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).expect("CONNACK arrives");
    assert_eq!(ack, [0x20, 2, 0, 0], "CONNACK accepted");
    let _ = s.write_all(&[0xe0, 0]);

    let mut h = TcpStream::connect_timeout(&app.http, deadline).expect("HTTP port accepts");
    h.set_read_timeout(Some(deadline)).expect("timeout");
    h.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("send GET");
    let mut resp = Vec::new();
    let _ = h.read_to_end(&mut resp);
    assert!(resp.starts_with(b"HTTP/1.1 200"), "healthz: {:?}", String::from_utf8_lossy(&resp));
}

fuzz_target!(|data: &[u8]| {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let app = app();
    // A first byte 'U' makes the session MQTT 5.0; any other input is a
    // 3.1.1 byte stream (so the 3.1.1 seeds keep their meaning).
    let (connect, data) = match data.split_first() {
        Some((b'U', rest)) => (&app.connect5, rest),
        _ => (&app.connect, data),
    };
    let closed = app.rt.block_on(async {
        let (client, server) = tokio::io::duplex(16 * 1024);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        // Sending and reading run side by side: a server blocked on a full
        // pipe of answers must not stall the input behind it.
        let send = async {
            // The server may close early (protocol error): later writes fail.
            let _ = to_server.write_all(connect).await;
            let _ = to_server.write_all(data).await;
            let _ = to_server.shutdown().await;
        };
        let drain = async {
            let mut buf = [0u8; 4096];
            while matches!(from_server.read(&mut buf).await, Ok(n) if n > 0) {}
        };
        let session = async {
            assert!(app.running.serve_mqtt(server).await.is_some(), "a connection slot is free");
        };
        let all = async { tokio::join!(send, drain, session) };
        tokio::time::timeout(Duration::from_secs(2), all).await.is_ok()
    });
    if !closed || RUNS.fetch_add(1, Ordering::Relaxed) % 1024 == 0 {
        alive(app);
    }
});
