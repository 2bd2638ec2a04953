//! The wire protocols a device may speak, over rumqttd's codecs: MQTT 3.1
//! (`MQIsdp`, level 3), 3.1.1 (level 4) and 5.0 (level 5), told apart by
//! the CONNECT. Also what rumqttd keeps private about a PUBLISH (its QoS,
//! DUP and packet id).

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{Packet, Protocol, Publish};

/// The protocol a connection speaks, from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// MQTT 3.1: decoded as 3.1.1 (its CONNECT rewritten), answered as 3.1.
    V31,
    V311,
    V5,
}

impl Version {
    pub(crate) fn is_v5(self) -> bool {
        self == Version::V5
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Version::V31 => "3.1",
            Version::V311 => "3.1.1",
            Version::V5 => "5.0",
        }
    }
}

/// rumqttd's v4 or v5 codec.
pub(crate) struct Codec {
    pub version: Version,
}

impl Codec {
    /// Decodes the packet at the head of `buf`. A packet only a server
    /// sends (CONNACK, SUBACK, UNSUBACK, PINGRESP) is an error here: rumqttd's
    /// v5 reader panics (`unreachable!`) on a CONNACK or UNSUBACK with a body.
    pub(crate) fn read(&mut self, buf: &mut BytesMut, max: usize) -> Result<Packet, rumqttd::protocol::Error> {
        if let Some(&first) = buf.first() {
            let kind = first >> 4;
            if matches!(kind, 2 | 9 | 11 | 13) {
                return Err(rumqttd::protocol::Error::InvalidPacketType(kind));
            }
        }
        match self.version {
            Version::V5 => V5.read_mut(buf, max),
            _ => V4.read_mut(buf, max),
        }
    }

    /// Encodes `packet`; for 3.x its properties (5.0 only) are dropped, as
    /// rumqttd's v4 encoder refuses them.
    pub(crate) fn write(&self, packet: Packet, buf: &mut BytesMut) -> Result<usize, rumqttd::protocol::Error> {
        if self.version.is_v5() {
            return V5.write(packet, buf);
        }
        let packet = match packet {
            Packet::Publish(p, _) => Packet::Publish(p, None),
            Packet::PubAck(p, _) => Packet::PubAck(p, None),
            Packet::PubRec(p, _) => Packet::PubRec(p, None),
            Packet::PubRel(p, _) => Packet::PubRel(p, None),
            Packet::PubComp(p, _) => Packet::PubComp(p, None),
            Packet::SubAck(p, _) => Packet::SubAck(p, None),
            Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
            Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
            other => other,
        };
        V4.write(packet, buf)
    }
}

/// What the head of a buffer says about the CONNECT it starts with.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Hello {
    /// Too few bytes to tell.
    More,
    Version(Version),
    /// A protocol name or level this listener does not speak.
    Unsupported(String),
}

/// Reads the protocol name and level of the CONNECT at the head of `buf`.
/// A 3.1 CONNECT is rewritten in place as the 3.1.1 one it is otherwise
/// identical to (name `MQTT`, level 4), so one decoder serves both.
pub(crate) fn hello(buf: &mut BytesMut) -> Hello {
    if crate::mqtt::framing::overlong_length(buf) {
        return Hello::Unsupported("malformed packet: remaining length encoded in more than 4 bytes".into());
    }
    let Some((first, body)) = crate::mqtt::framing::fixed_header(buf) else { return Hello::More };
    if first >> 4 != 1 {
        return Hello::Unsupported("first packet is not CONNECT".into());
    }
    let Some(len) = buf.get(body..body + 2) else { return Hello::More };
    let name_len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    let Some(&level) = buf.get(body + 2 + name_len) else { return Hello::More };
    let name = &buf[body + 2..body + 2 + name_len];
    match (name, level) {
        (b"MQTT", 4) => Hello::Version(Version::V311),
        (b"MQTT", 5) => Hello::Version(Version::V5),
        (b"MQIsdp", 3) => {
            // Remaining length shrinks by 2 ("MQIsdp" → "MQTT").
            let mut remaining = 0usize;
            for (i, b) in buf[1..body].iter().enumerate() {
                remaining |= usize::from(b & 0x7f) << (7 * i);
            }
            let mut out = BytesMut::with_capacity(buf.len());
            out.put_u8(0x10);
            let mut r = remaining - 2;
            loop {
                let mut b = (r % 128) as u8;
                r /= 128;
                if r > 0 {
                    b |= 0x80;
                }
                out.put_u8(b);
                if r == 0 {
                    break;
                }
            }
            out.put_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4]);
            out.put_slice(&buf[body + 2 + name_len + 1..]);
            *buf = out;
            Hello::Version(Version::V31)
        }
        _ => Hello::Unsupported(format!(
            "protocol {:?} level {level} (this listener speaks MQTT 3.1, 3.1.1 and 5.0)",
            String::from_utf8_lossy(name)
        )),
    }
}

#[cfg(test)]
/// QoS, DUP, RETAIN and packet id of a decoded PUBLISH (rumqttd keeps them
/// private; its internal serialization exposes them).
pub(crate) fn publish_flags(p: &Publish) -> (u8, bool, bool, u16) {
    let raw = p.serialize();
    let (h, pkid) = (raw[0], u16::from_be_bytes([raw[1], raw[2]]));
    ((h >> 1) & 0b11, h & 0b1000 != 0, h & 1 != 0, pkid)
}

/// A PUBLISH with the given QoS, DUP, RETAIN and packet id.
pub(crate) fn publish(qos: u8, dup: bool, retain: bool, pkid: u16, topic: &Bytes, payload: &Bytes) -> Publish {
    let mut o = BytesMut::with_capacity(5 + topic.len() + payload.len());
    o.put_u8(0b0011_0000 | u8::from(retain) | (qos << 1) | (u8::from(dup) << 3));
    o.put_u16(if qos == 0 { 0 } else { pkid });
    o.put_u16(topic.len() as u16);
    o.put_slice(topic);
    o.put_slice(payload);
    Publish::deserialize(o.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_31_connect_is_read_as_311() {
        // CONNECT, MQIsdp level 3, clean, keep-alive 60, client id "a".
        let mut b = BytesMut::from(&[0x10, 15, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60, 0, 1, b'a'][..]);
        assert_eq!(hello(&mut b), Hello::Version(Version::V31));
        assert_eq!(&b[..], &[0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'a']);
        let mut codec = Codec { version: Version::V311 };
        assert!(matches!(codec.read(&mut b, 1024), Ok(Packet::Connect(..))));
    }

    #[test]
    fn packets_only_a_server_sends_are_refused_not_panicked_on() {
        for version in [Version::V311, Version::V5] {
            // CONNACK, SUBACK, UNSUBACK, PINGRESP, each with a body.
            for kind in [2u8, 9, 11, 13] {
                let mut b = BytesMut::from(&[kind << 4, 3, 0, 1, 0][..]);
                let got = Codec { version }.read(&mut b, 1024);
                assert!(
                    matches!(got, Err(rumqttd::protocol::Error::InvalidPacketType(k)) if k == kind),
                    "{version:?} type {kind}: {got:?}"
                );
            }
        }
    }

    #[test]
    fn levels_are_told_apart_and_unknown_ones_named() {
        let mut v5 = BytesMut::from(&[0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', 5][..]);
        assert_eq!(hello(&mut v5), Hello::Version(Version::V5));
        let mut v6 = BytesMut::from(&[0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', 6][..]);
        assert!(matches!(hello(&mut v6), Hello::Unsupported(m) if m.contains("level 6")));
        assert_eq!(hello(&mut BytesMut::from(&[0x10, 10, 0][..])), Hello::More);
    }

    #[test]
    fn publish_flags_round_trip() {
        let p = publish(2, true, true, 77, &Bytes::from("t"), &Bytes::from("{}"));
        assert_eq!(publish_flags(&p), (2, true, true, 77));
    }
}
