//! A connection's bytes: the socket halves, the read and write buffers and
//! the codec. Writing never blocks the session: packets are encoded into a
//! bounded buffer that the session's loop drains while it also reads and
//! watches keep-alive, revocation and shutdown; a client that takes none of
//! it for `mqtt.write_timeout` is a client that stopped reading.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use rumqttd::protocol::Packet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::super::codec::{Codec, Hello, Version, hello};

/// Byte streams a session runs over: TCP, or a WebSocket's binary frames.
pub(crate) type Reader = Box<dyn AsyncRead + Send + Sync + Unpin>;
pub(crate) type Writer = Box<dyn AsyncWrite + Send + Sync + Unpin>;

/// Initial read and write buffer of a connection (a thousand idle devices
/// are a thousand of these; both grow to what a connection actually sends).
const SESSION_BUF: usize = 1024;

/// Bytes waiting to be written beyond which nothing more is taken from
/// the session's mailbox until the client reads.
pub(super) const WRITE_HIGH: usize = 256 * 1024;

/// Beyond this the client is not read either, so the acks of a client
/// that publishes and never reads cannot pile up (its write timeout ends
/// it). Between the two the client is still read: keep-alive and its
/// PINGREQs keep working while deliveries wait.
const WRITE_HARD: usize = 2 * WRITE_HIGH;

/// Most bytes a connection taken over still reads of what had arrived.
const ARRIVED_MAX: usize = 1 << 20;

/// How long a connection taken over waits for more of what had been sent
/// (ten times this in all).
const ARRIVED_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

pub(super) struct Wire {
    pub reader: Reader,
    pub writer: Writer,
    pub read_buf: BytesMut,
    pub write_buf: BytesMut,
    pub codec: Codec,
    /// Since when written bytes wait without the client taking any.
    pub stalled_since: Option<tokio::time::Instant>,
    /// The client's 5.0 Maximum Packet Size (none: unbounded).
    pub max_packet: usize,
}

impl Wire {
    pub(super) fn new(reader: Reader, writer: Writer) -> Self {
        Self {
            reader,
            writer,
            read_buf: BytesMut::with_capacity(SESSION_BUF),
            write_buf: BytesMut::with_capacity(SESSION_BUF),
            codec: Codec { version: Version::V311 },
            stalled_since: None,
            max_packet: usize::MAX,
        }
    }

    pub(super) fn version(&self) -> Version {
        self.codec.version
    }

    /// Encodes `packet` into the write buffer (written by the session loop).
    pub(super) fn queue(&mut self, packet: Packet) -> Result<(), String> {
        let was_empty = self.write_buf.is_empty();
        let start = self.write_buf.len();
        // 5.0: an answer whose reason string or user properties would make
        // it larger than the client's Maximum Packet Size goes without them
        // (MQTT 5.0, 3.4.2.2.2 and the like for every answer).
        let lean = (self.max_packet != usize::MAX).then(|| without_reasons(&packet)).flatten();
        self.codec.write(packet, &mut self.write_buf).map_err(|e| format!("encode: {e}"))?;
        if self.write_buf.len() - start > self.max_packet
            && let Some(lean) = lean
        {
            self.write_buf.truncate(start);
            self.codec.write(lean, &mut self.write_buf).map_err(|e| format!("encode: {e}"))?;
        }
        if was_empty && !self.write_buf.is_empty() {
            self.stalled_since = Some(tokio::time::Instant::now());
        }
        Ok(())
    }

    /// Room for more deliveries.
    pub(super) fn has_room(&self) -> bool {
        self.write_buf.len() < WRITE_HIGH
    }

    /// Room for what reading the client may make us write (acks, PINGRESP).
    pub(super) fn may_read(&self) -> bool {
        self.write_buf.len() < WRITE_HARD
    }

    /// `n` bytes were taken by the client.
    pub(super) fn wrote(&mut self, n: usize) {
        self.write_buf.advance(n);
        self.stalled_since = (!self.write_buf.is_empty()).then(tokio::time::Instant::now);
    }

    /// Writes what is buffered, within `limit` (a session ending: a final
    /// DISCONNECT, and what was queued before it).
    pub(super) async fn flush_within(&mut self, limit: Duration) {
        let write = async {
            while !self.write_buf.is_empty() {
                match self.writer.write(&self.write_buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => self.write_buf.advance(n),
                }
            }
            let _ = self.writer.flush().await;
        };
        let _ = tokio::time::timeout(limit, write).await;
    }

    /// Reads the first bytes until the protocol is known; a protocol this
    /// listener does not speak is answered with CONNACK 0x01 (3.1.1's
    /// "unacceptable protocol version") and closed.
    pub(super) async fn read_hello(&mut self) -> Result<Option<Version>, String> {
        loop {
            match hello(&mut self.read_buf) {
                Hello::Version(v) => return Ok(Some(v)),
                Hello::Unsupported(why) => {
                    if self.read_buf.first().is_some_and(|b| b >> 4 == 1) {
                        let _ = self.writer.write_all(&[0x20, 2, 0, 1]).await;
                        let _ = self.writer.flush().await;
                    }
                    return Err(why);
                }
                Hello::More => {}
            }
            if self.read_buf.len() > 16 * 1024 {
                return Err("no protocol name and level in the first 16 KiB".into());
            }
            match self.reader.read_buf(&mut self.read_buf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// Reads one packet; `None` on a clean EOF between packets.
    pub(super) async fn read_packet(&mut self, max: usize) -> Result<Option<Packet>, String> {
        loop {
            super::super::framing::check(&self.read_buf)?;
            match self.codec.read(&mut self.read_buf, max) {
                Ok(p) => return Ok(Some(p)),
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(format!("malformed packet: {e}")),
            }
            match self.reader.read_buf(&mut self.read_buf).await {
                Ok(0) if self.read_buf.is_empty() => return Ok(None),
                Ok(0) => return Err("connection closed mid-packet".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// Reads what has already arrived (at most [`ARRIVED_MAX`] bytes),
    /// waiting for more only briefly: what the client sent before it
    /// connected again is in the socket, or on its way on a loopback or
    /// LAN path, by the time its new CONNECT is read.
    pub(super) async fn read_arrived(&mut self) {
        let start = self.read_buf.len();
        let deadline = tokio::time::Instant::now() + ARRIVED_WAIT * 10;
        while self.read_buf.len() - start < ARRIVED_MAX && tokio::time::Instant::now() < deadline {
            match tokio::time::timeout(ARRIVED_WAIT, self.reader.read_buf(&mut self.read_buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => break,
            }
        }
    }
}

/// `packet` without the reason string and user properties of its
/// properties, when it is an answer that has some.
fn without_reasons(packet: &Packet) -> Option<Packet> {
    use rumqttd::protocol::{
        ConnAckProperties, DisconnectProperties, PubAckProperties, PubCompProperties, PubRecProperties,
        PubRelProperties, SubAckProperties, UnsubAckProperties,
    };
    Some(match packet {
        Packet::PubAck(a, Some(_)) => Packet::PubAck(a.clone(), None::<PubAckProperties>),
        Packet::PubRec(a, Some(_)) => Packet::PubRec(a.clone(), None::<PubRecProperties>),
        Packet::PubRel(a, Some(_)) => Packet::PubRel(a.clone(), None::<PubRelProperties>),
        Packet::PubComp(a, Some(_)) => Packet::PubComp(a.clone(), None::<PubCompProperties>),
        Packet::SubAck(a, Some(_)) => Packet::SubAck(a.clone(), None::<SubAckProperties>),
        Packet::UnsubAck(a, Some(_)) => Packet::UnsubAck(a.clone(), None::<UnsubAckProperties>),
        Packet::ConnAck(a, Some(p)) => Packet::ConnAck(
            a.clone(),
            Some(ConnAckProperties { reason_string: None, user_properties: Vec::new(), ..p.clone() }),
        ),
        Packet::Disconnect(d, Some(p)) => Packet::Disconnect(
            d.clone(),
            Some(DisconnectProperties { reason_string: None, user_properties: Vec::new(), ..p.clone() }),
        ),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::PingResp;

    fn wire() -> (Wire, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(ours);
        (Wire::new(Box::new(r), Box::new(w)), theirs)
    }

    #[tokio::test]
    async fn what_waits_to_be_written_stops_deliveries_then_reading_and_dates_the_stall() {
        let (mut w, _client) = wire();
        assert!(w.has_room() && w.may_read() && w.stalled_since.is_none());
        w.queue(Packet::PingResp(PingResp)).unwrap();
        let since = w.stalled_since.expect("bytes wait from now");
        assert_eq!(&w.write_buf[..], [0xd0, 0]);
        w.write_buf.resize(WRITE_HIGH, 0);
        assert!(!w.has_room() && w.may_read(), "over the high mark: no more deliveries, still read");
        w.write_buf.resize(WRITE_HARD, 0);
        assert!(!w.may_read(), "over the hard mark: not read either");
        tokio::time::sleep(Duration::from_millis(2)).await;
        w.wrote(WRITE_HARD - 10);
        assert!(w.stalled_since.is_some_and(|t| t > since), "the client took some: the stall starts again");
        w.wrote(10);
        assert!(w.stalled_since.is_none() && w.write_buf.is_empty());
    }

    #[tokio::test]
    async fn a_packet_split_across_reads_is_read_whole_and_a_clean_eof_is_none() {
        use tokio::io::AsyncWriteExt;
        let (mut w, mut client) = wire();
        client.write_all(&[0xc0]).await.unwrap(); // PINGREQ, first byte
        let read = tokio::spawn(async move {
            let p = w.read_packet(1024).await;
            (w, p)
        });
        client.write_all(&[0x00]).await.unwrap();
        let (mut w, p) = read.await.unwrap();
        assert!(matches!(p, Ok(Some(Packet::PingReq(_)))), "{p:?}");
        drop(client);
        assert!(matches!(w.read_packet(1024).await, Ok(None)));
    }

    #[tokio::test]
    async fn a_protocol_it_does_not_speak_gets_connack_1_and_no_session() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut w, mut client) = wire();
        // CONNECT of "MQTT" level 9.
        client.write_all(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 9, 2, 0, 60, 0, 0]).await.unwrap();
        assert!(w.read_hello().await.is_err());
        let mut ack = [0u8; 4];
        client.read_exact(&mut ack).await.unwrap();
        assert_eq!(ack, [0x20, 2, 0, 1]);
    }
}
