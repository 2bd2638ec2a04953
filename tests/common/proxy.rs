//! A TCP fault proxy between the appliance and PostgreSQL. Modes:
//! - `Pass`: bytes flow both ways;
//! - `Refuse`: the listening socket is closed (connects get ECONNREFUSED);
//! - `Reset`: every connection, open or new, is closed with RST;
//! - `Blackhole`: connections are accepted and then stay silent: bytes are
//!   swallowed in both directions, nothing is closed (a silent partition);
//! - `Bandwidth(bytes_per_second)`: bytes flow, but each direction is one
//!   token bucket shared by every connection (a slow link, not a slow
//!   socket). Accepted sockets have a small receive buffer and Ethernet-sized
//!   segments (loopback's 64 KB ones would let the sender's kernel queue
//!   megabytes), so the queue in front of the link stays short and the
//!   sender feels the rate, as behind a real slow uplink (the kernel here
//!   has no netem).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Refuse,
    Reset,
    Blackhole,
    /// Bytes per second, each direction.
    Bandwidth(u64),
}

impl Mode {
    /// Bytes reach the other side (perhaps slowly).
    fn passes(self) -> bool {
        matches!(self, Mode::Pass | Mode::Bandwidth(_))
    }
}

/// One direction of the link: tokens are bytes, refilled at the mode's rate,
/// at most 50 ms worth banked. Connections may overdraw it together; the
/// debt is paid before anyone sends again.
struct Bucket {
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new() -> Arc<Self> {
        Arc::new(Self { state: Mutex::new((0.0, Instant::now())) })
    }

    /// Bytes that may be sent now at `rate` bytes/s.
    fn available(&self, rate: u64) -> usize {
        let mut s = self.state.lock().unwrap();
        let now = Instant::now();
        let burst = (rate as f64 / 20.0).max(1500.0);
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * rate as f64).min(burst);
        s.1 = now;
        if s.0 >= 1.0 { s.0 as usize } else { 0 }
    }

    fn spend(&self, n: usize) {
        self.state.lock().unwrap().0 -= n as f64;
    }
}

/// The link's two directions, shared by all connections.
#[derive(Clone)]
struct Link {
    up: Arc<Bucket>,
    down: Arc<Bucket>,
}

/// Receive buffer of accepted sockets: a short queue in front of the link.
const RECV_BUFFER: u32 = 64 * 1024;
/// Segment size offered to connecting clients, as on Ethernet.
const MSS: libc::c_int = 1460;

async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use std::os::fd::AsRawFd;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_recv_buffer_size(RECV_BUFFER)?;
    // SAFETY: setsockopt on a socket we own, with a c_int option value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&MSS as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A running proxy; dropped with the test's runtime.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
}

impl Proxy {
    /// Proxies 127.0.0.1:<free port> → `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, rx) = watch::channel(Mode::Pass);
        let link = Link { up: Bucket::new(), down: Bucket::new() };
        tokio::spawn(accept_loop(Some(listener), addr, target, rx, link));
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
    link: Link,
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
                    match bind(addr).await {
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
                tokio::spawn(pipe(client, target, mode.clone(), link.clone()));
            }
            r = mode.changed() => if r.is_err() { return },
        }
    }
}

async fn pipe(client: TcpStream, target: SocketAddr, mut mode: watch::Receiver<Mode>, link: Link) {
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
        // Under a bandwidth limit a direction reads only what its bucket
        // allows now; with nothing allowed it waits for the refill.
        let rate = match *mode.borrow() {
            Mode::Bandwidth(r) => Some(r.max(1)),
            _ => None,
        };
        let up_allowed = rate.map_or(b1.len(), |r| link.up.available(r).min(b1.len()));
        let down_allowed = rate.map_or(b2.len(), |r| link.down.available(r).min(b2.len()));
        tokio::select! {
            r = cr.read(&mut b1[..up_allowed]), if up_allowed > 0 => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let m = *mode.borrow();
                    if rate.is_some() { link.up.spend(n) }
                    // Refuse, Reset and Blackhole swallow the bytes.
                    if m.passes() && sw.write_all(&b1[..n]).await.is_err() { return }
                }
            },
            r = sr.read(&mut b2[..down_allowed]), if down_allowed > 0 => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let m = *mode.borrow();
                    if rate.is_some() { link.down.spend(n) }
                    if m.passes() && cw.write_all(&b2[..n]).await.is_err() { return }
                }
            },
            _ = tokio::time::sleep(Duration::from_millis(5)), if up_allowed == 0 || down_allowed == 0 => {}
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
