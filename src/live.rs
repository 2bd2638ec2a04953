//! What a running appliance says about itself, asked over its own HTTP
//! port: `outpost status` and `outpost doctor` show the uplink this way.
//! A plain HTTP/1.0 GET, so the product links no HTTP client.

use std::time::Duration;

/// The `/api/v1/status` of an appliance listening on `addr` (`0.0.0.0`
/// means this machine), if it answers within a second. A plain HTTP/1.0
/// GET: the product links no HTTP client. `http` gives the address and,
/// when `status_token_file` is set and readable, the token to send.
pub(crate) async fn status(http: &crate::config::HttpConfig) -> Option<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut addr = http.listen;
    let auth = http.status_token().ok().flatten().map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET /api/v1/status HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.take(1 << 20).read_to_end(&mut buf).await.ok()?;
        let at = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
        (buf.starts_with(b"HTTP/1.") && buf.get(9..12) == Some(b"200"))
            .then(|| serde_json::from_slice(&buf[at + 4..]).ok())?
    };
    tokio::time::timeout(Duration::from_secs(1), fetch).await.ok()?
}
