//! A request line too long for the server is answered like every other
//! error, with the JSON error body: hyper answers a URI over its limit
//! (64 KiB) with a bare `414` and no body, from inside its parser, where no
//! handler can reach. So the bytes of a connection pass through this guard
//! first. It follows the HTTP/1.1 framing just enough to know where each
//! request line starts (after the previous request's headers and its
//! `Content-Length` body); a request line longer than [`MAX_REQUEST_LINE`]
//! gets `414` with the JSON body and the connection closes. After an
//! upgrade (WebSocket) or a chunked body it stands aside for the rest of
//! the connection (hyper's own limits still apply there).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest request line (method, target, version) this server reads.
pub(super) const MAX_REQUEST_LINE: usize = 16 * 1024;

/// Where the guard is in the request stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// In a request line, this many bytes into it.
    Line(usize),
    /// In the header section: bytes of the current header line so far, its
    /// first bytes (to read `Content-Length`), and what earlier ones said.
    Headers { line: usize, body: Option<u64>, chunked: bool, upgrade: bool },
    /// In a body with this many bytes left.
    Body(u64),
    /// Past what it can follow: every byte passes.
    Aside,
    /// Over the limit: the 414 is being written, then EOF.
    Refusing(usize),
}

/// An IO that checks request-line lengths on the way in.
pub(super) struct LineGuard<IO> {
    io: IO,
    at: At,
    /// The current header line's first bytes (lower-cased on reading).
    head: Vec<u8>,
}

impl<IO> LineGuard<IO> {
    pub(super) fn new(io: IO) -> Self {
        Self { io, at: At::Line(0), head: Vec::with_capacity(32) }
    }

    /// Follows `bytes` through the framing; `Some(i)` when a request line
    /// went over the limit at `bytes[i]`.
    fn follow(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            match self.at {
                At::Aside | At::Refusing(_) => return None,
                At::Line(n) => {
                    let b = bytes[i];
                    if b == b'\n' {
                        // An empty line between requests is allowed (RFC 9112 2.2).
                        self.at = if n <= 1 { At::Line(0) } else { Self::headers() };
                        self.head.clear();
                    } else if n + 1 > MAX_REQUEST_LINE {
                        self.at = At::Refusing(0);
                        return Some(i);
                    } else {
                        self.at = At::Line(n + 1);
                    }
                    i += 1;
                }
                At::Headers { line, body, chunked, upgrade } => {
                    let b = bytes[i];
                    i += 1;
                    if b != b'\n' {
                        if self.head.len() < 64 {
                            self.head.push(b.to_ascii_lowercase());
                        }
                        self.at = At::Headers { line: line + 1, body, chunked, upgrade };
                        continue;
                    }
                    if line <= 1 {
                        // The end of the headers.
                        self.at = if upgrade || chunked {
                            At::Aside
                        } else {
                            match body {
                                Some(n) if n > 0 => At::Body(n),
                                _ => At::Line(0),
                            }
                        };
                        continue;
                    }
                    let (mut body, mut chunked, mut upgrade) = (body, chunked, upgrade);
                    let h = std::str::from_utf8(&self.head).unwrap_or("").trim_end_matches('\r');
                    if let Some(v) = h.strip_prefix("content-length:") {
                        match v.trim().parse() {
                            Ok(n) => body = Some(n),
                            Err(_) => chunked = true, // hyper refuses it; stand aside
                        }
                    } else if h.starts_with("transfer-encoding:") {
                        chunked = true;
                    } else if h.starts_with("upgrade:") {
                        upgrade = true;
                    }
                    self.head.clear();
                    self.at = At::Headers { line: 0, body, chunked, upgrade };
                }
                At::Body(left) => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.at = if take == left { At::Line(0) } else { At::Body(left - take) };
                }
            }
        }
        None
    }

    fn headers() -> At {
        At::Headers { line: 0, body: None, chunked: false, upgrade: false }
    }
}

/// The 414, with the body every other error has.
fn refusal() -> Vec<u8> {
    let body = format!(
        r#"{{"error":"uri_too_long","message":"the request line is longer than {MAX_REQUEST_LINE} bytes; send long filters in fewer, shorter parameters"}}"#
    );
    format!(
        "HTTP/1.1 414 URI Too Long\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for LineGuard<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let At::Refusing(sent) = this.at {
            // Write the refusal, then the reader sees the end: hyper closes.
            let answer = refusal();
            let mut sent = sent;
            while sent < answer.len() {
                let n = ready!(Pin::new(&mut this.io).poll_write(cx, &answer[sent..]))?;
                if n == 0 {
                    break;
                }
                sent += n;
                this.at = At::Refusing(sent);
            }
            ready!(Pin::new(&mut this.io).poll_flush(cx))?;
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if let Some(at) = this.follow(new) {
            // What came before passes; the rest of the line never does (the
            // parser then sees the end of the connection, not its 414).
            buf.set_filled(before + at);
            tracing::debug!("request line over {MAX_REQUEST_LINE} bytes: 414");
            if at == 0 {
                return Pin::new(&mut *this).poll_read(cx, buf);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for LineGuard<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> LineGuard<tokio::io::DuplexStream> {
        LineGuard::new(tokio::io::duplex(16).0)
    }

    #[test]
    fn request_lines_are_followed_across_bodies_and_keep_alive() {
        let mut g = guard();
        let post = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        assert!(g.follow(post).is_none());
        assert_eq!(g.at, At::Line(0), "after a body, a request line");
        // The body's bytes are not a request line, however long.
        let mut big = b"POST /b HTTP/1.1\r\nContent-Length: 40000\r\n\r\n".to_vec();
        big.extend(vec![b'x'; 40_000]);
        assert!(g.follow(&big).is_none());
        assert_eq!(g.at, At::Line(0));
        let mut long = b"GET /".to_vec();
        long.extend(vec![b'a'; MAX_REQUEST_LINE]);
        assert_eq!(g.follow(&long), Some(MAX_REQUEST_LINE), "an over-long request line");
    }

    #[test]
    fn it_stands_aside_after_an_upgrade_or_a_chunked_body() {
        let mut g = guard();
        assert!(g.follow(b"GET /mqtt HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").is_none());
        assert_eq!(g.at, At::Aside);
        assert!(g.follow(&vec![b'x'; 3 * MAX_REQUEST_LINE]).is_none(), "WebSocket frames pass");
        let mut g = guard();
        assert!(g.follow(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").is_none());
        assert_eq!(g.at, At::Aside);
    }

    #[tokio::test]
    async fn an_over_long_request_line_gets_the_json_414_and_the_end() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let mut g = LineGuard::new(server);
        let mut req = b"GET /api/v1/realtime/acme/poll?event_types=".to_vec();
        req.extend(vec![b'a'; MAX_REQUEST_LINE + 10]);
        req.extend(b" HTTP/1.1\r\n\r\n");
        client.write_all(&req).await.unwrap();
        let mut seen = Vec::new();
        g.read_to_end(&mut seen).await.unwrap();
        assert!(seen.len() <= MAX_REQUEST_LINE, "the line does not reach the parser whole: {}", seen.len());
        let mut answer = vec![0u8; 512];
        let n = client.read(&mut answer).await.unwrap();
        let text = String::from_utf8_lossy(&answer[..n]);
        assert!(text.starts_with("HTTP/1.1 414 "), "{text}");
        assert!(text.contains(r#""error":"uri_too_long""#), "{text}");
    }
}
