//! A TCP fault proxy between the appliance and PostgreSQL. Modes:
//! - `Pass`: bytes flow both ways;
//! - `Refuse`: the listening socket is closed (connects get ECONNREFUSED);
//! - `Reset`: every connection, open or new, is closed with RST;
//! - `Blackhole`: connections are accepted and then stay silent: bytes are
//!   swallowed in both directions, nothing is closed (a silent partition).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Refuse,
    Reset,
    Blackhole,
}

/// A running proxy; dropped with the test's runtime.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
}

impl Proxy {
    /// Proxies 127.0.0.1:<free port> → `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, rx) = watch::channel(Mode::Pass);
        tokio::spawn(accept_loop(Some(listener), addr, target, rx));
        Self { addr, mode }
    }

    pub fn set(&self, m: Mode) {
        self.mode.send_replace(m);
    }

    /// Port to give the appliance.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

async fn accept_loop(
    mut listener: Option<TcpListener>,
    addr: SocketAddr,
    target: SocketAddr,
    mut mode: watch::Receiver<Mode>,
) {
    loop {
        let current = *mode.borrow_and_update();
        if current == Mode::Refuse {
            listener = None;
            if mode.changed().await.is_err() {
                return;
            }
            continue;
        }
        let l = match &listener {
            Some(l) => l,
            None => {
                // Rebind the same port once refusing ends.
                let mut tries = 0;
                loop {
                    match TcpListener::bind(addr).await {
                        Ok(l) => break listener.insert(l),
                        Err(e) if tries < 100 => {
                            tries += 1;
                            let _ = e;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("proxy cannot rebind {addr}: {e}"),
                    }
                }
            }
        };
        tokio::select! {
            r = l.accept() => {
                let Ok((client, _)) = r else { continue };
                tokio::spawn(pipe(client, target, mode.clone()));
            }
            r = mode.changed() => if r.is_err() { return },
        }
    }
}

async fn pipe(client: TcpStream, target: SocketAddr, mut mode: watch::Receiver<Mode>) {
    // Linger 0 makes close send RST; with a zero timeout drop does not block.
    #[allow(deprecated)]
    let reset = |s: &TcpStream| {
        let _ = s.set_linger(Some(Duration::ZERO));
    };
    if *mode.borrow() == Mode::Reset {
        reset(&client);
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        reset(&client);
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let (mut b1, mut b2) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        tokio::select! {
            r = cr.read(&mut b1) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let m = *mode.borrow();
                    // Anything but Pass swallows the bytes.
                    if m == Mode::Pass && sw.write_all(&b1[..n]).await.is_err() { return }
                }
            },
            r = sr.read(&mut b2) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let m = *mode.borrow();
                    if m == Mode::Pass && cw.write_all(&b2[..n]).await.is_err() { return }
                }
            },
            r = mode.changed() => {
                if r.is_err() { return }
                let m = *mode.borrow();
                if m == Mode::Reset {
                    let (c, s) = (cr.reunite(cw), sr.reunite(sw));
                    if let (Ok(c), Ok(s)) = (c, s) {
                        reset(&c);
                        reset(&s);
                    }
                    return;
                }
            }
        }
    }
}
