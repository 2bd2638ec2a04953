//! The HTTP accept loop: hyper's HTTP/1 connections with a header read
//! timeout, a body read timeout, and a cap on open connections that a
//! slowloris cannot fill. `axum::serve` has none of these.
//!
//! At `http.max_connections`, a new connection makes room by closing the
//! oldest connection that has not yet sent a complete request (a TLS
//! handshake in progress, a half-sent request), else the oldest idle
//! keep-alive one. Only when every connection is busy with a request is the
//! new one refused: answered 503 on plain HTTP, closed on HTTPS (a
//! plaintext answer on a TLS socket is only garbage to the client). A TLS
//! handshake has `http.tls_handshake_timeout`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

/// The `[http]` limits the accept loop enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub tls_handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
}

/// One open connection, as the cap sees it.
struct Conn {
    /// A complete request arrived at least once.
    started: AtomicBool,
    /// Requests being answered now.
    active: AtomicUsize,
    close: CancellationToken,
}

#[derive(Default)]
struct Open {
    /// By accept order, so the oldest come first.
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
}

impl Open {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Closes the oldest half-sent connection, else the oldest idle one;
    /// false when every connection is busy.
    fn evict(&self) -> bool {
        let conns = self.lock();
        let victim = conns
            .values()
            .find(|c| !c.started.load(Ordering::Relaxed) && !c.close.is_cancelled())
            .or_else(|| conns.values().find(|c| c.active.load(Ordering::Relaxed) == 0 && !c.close.is_cancelled()));
        match victim {
            Some(c) => {
                c.close.cancel();
                true
            }
            None => false,
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets in-flight
/// requests finish (the caller bounds how long).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<()> {
    let router = router.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(limits.body_timeout));
    let open = Arc::new(Open::default());
    let tasks = tokio_util::task::TaskTracker::new();
    let mut next_id = 0u64;
    while let Some((stream, peer)) = accept(&listener, &shutdown, "http").await {
        let _ = stream.set_nodelay(true);
        if open.lock().len() >= limits.max_connections && !open.evict() {
            if tls.is_some() {
                tracing::warn!(%peer, max = limits.max_connections, "http.max_connections reached, every connection busy; closing the new TLS connection");
                drop(stream);
            } else {
                tracing::warn!(%peer, max = limits.max_connections, "http.max_connections reached, every connection busy; answering 503");
                tokio::spawn(busy(stream));
            }
            continue;
        }
        next_id += 1;
        let id = next_id;
        let conn = Arc::new(Conn {
            started: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            close: CancellationToken::new(),
        });
        open.lock().insert(id, conn.clone());
        let (router, state) = (router.clone(), conn.clone());
        let (open, shutdown, tls) = (open.clone(), shutdown.clone(), tls.clone());
        tasks.spawn(async move {
            // The TLS handshake, in this connection's task (slow handshakes
            // never hold up accept), is a connection like any other: it
            // counts against http.max_connections and can be closed to make
            // room; it has its own timeout.
            // The device a TLS client certificate names, for every request
            // of the connection.
            let mut cert = None;
            let io = match tls {
                None => Either::Left(stream),
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream));
                    let outcome = tokio::select! {
                        r = handshake => match r {
                            Ok(Ok(s)) => Ok(s),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err("no handshake within http.tls_handshake_timeout".to_string()),
                        },
                        _ = conn.close.cancelled() => Err("closed to make room (http.max_connections)".to_string()),
                        _ = shutdown.cancelled() => Err("shutting down".to_string()),
                    };
                    match outcome {
                        Ok(s) => {
                            cert = crate::tls::ClientCert::of(s.get_ref().1).map(PeerCert);
                            Either::Right(s)
                        }
                        Err(why) => {
                            tracing::debug!(%peer, why, "https handshake failed");
                            open.lock().remove(&id);
                            return;
                        }
                    }
                }
            };
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                if let Some(c) = &cert {
                    req.extensions_mut().insert(c.clone());
                }
                state.started.store(true, Ordering::Relaxed);
                state.active.fetch_add(1, Ordering::Relaxed);
                let (mut router, state) = (router.clone(), state.clone());
                async move {
                    let resp = tower_service::Service::call(&mut router, req).await;
                    state.active.fetch_sub(1, Ordering::Relaxed);
                    resp
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(super::line_guard::LineGuard::new(io)), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                r = connection.as_mut() => if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "http connection ended");
                },
                _ = conn.close.cancelled() => {
                    tracing::debug!(%peer, "http connection closed to make room (http.max_connections)");
                }
                // Shutdown: finish the request in flight, then close.
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            open.lock().remove(&id);
        });
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// What the connection's TLS client certificate says (`tls::ClientCert`):
/// a request extension on every request of a connection that presented one.
#[derive(Debug, Clone)]
pub(crate) struct PeerCert(pub(crate) Result<crate::tls::ClientCert, String>);

/// The next connection on `listener`, or `None` once `shutdown` fires. A
/// failed accept (out of file descriptors and the like) pauses, never ends
/// the loop.
pub(crate) async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
    protocol: &str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(x) => return Some(x),
                Err(e) => {
                    tracing::warn!(error = %e, protocol, "accept failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// 503 for a connection over the cap while every open one is busy.
async fn busy(mut stream: tokio::net::TcpStream) {
    let body = r#"{"error":"unavailable","message":"http.max_connections reached and every connection is busy; retry shortly"}"#;
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(resp.as_bytes())).await;
}
