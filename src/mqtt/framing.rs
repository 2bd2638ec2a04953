//! Byte-level checks rumqttd's v4 codec does not make, and what it keeps
//! private: MQTT 3.1.1 fixed-header flags and the CONNECT reserved bit
//! (a violation closes the connection, [MQTT-2.2.2-2], [MQTT-3.1.2-3]),
//! and a PUBLISH's QoS, DUP and packet id. Packets are named by kind only:
//! their Debug output would carry credentials (a CONNECT's password).

use rumqttd::protocol::Packet;

/// The fixed header and where the variable header starts, if complete.
pub(crate) fn fixed_header(buf: &[u8]) -> Option<(u8, usize)> {
    let first = *buf.first()?;
    let mut i = 1;
    while *buf.get(i)? & 0x80 != 0 {
        i += 1;
        if i > 4 {
            return None;
        }
    }
    Some((first, i + 1))
}

/// True when the remaining length at the head of `buf` is malformed: a
/// fourth byte that still says "more" (MQTT allows at most four).
pub(crate) fn overlong_length(buf: &[u8]) -> bool {
    buf.len() >= 5 && buf[1..5].iter().all(|b| b & 0x80 != 0)
}

/// Checks the packet at the head of `buf` before it is decoded: the
/// remaining length's encoding, the flags each packet type must carry, and
/// CONNECT's reserved flag. `Ok` when the bytes so far are fine (or too few
/// to tell).
pub(crate) fn check(buf: &[u8]) -> Result<(), String> {
    if overlong_length(buf) {
        return Err("remaining length encoded in more than 4 bytes".into());
    }
    let Some((first, body)) = fixed_header(buf) else { return Ok(()) };
    let (kind, flags) = (first >> 4, first & 0x0f);
    let required = match kind {
        3 => None,                  // PUBLISH: DUP, QoS, RETAIN
        6 | 8 | 10 => Some(0b0010), // PUBREL, SUBSCRIBE, UNSUBSCRIBE
        _ => Some(0),
    };
    if let Some(r) = required
        && flags != r
    {
        return Err(format!("{} with fixed-header flags {flags:#06b} (must be {r:#06b})", kind_name(kind)));
    }
    if kind == 3 && (flags >> 1) & 0b11 == 3 {
        return Err("PUBLISH with QoS 3".into());
    }
    if kind == 1 {
        // Protocol name (2-byte length + name), level, then the connect flags.
        let Some(name_len) = buf.get(body..body + 2) else { return Ok(()) };
        let at = body + 2 + usize::from(u16::from_be_bytes([name_len[0], name_len[1]])) + 1;
        if let Some(flags) = buf.get(at)
            && flags & 1 != 0
        {
            return Err("CONNECT with the reserved flag set".into());
        }
    }
    Ok(())
}

/// QoS, DUP and packet id of the PUBLISH at the head of `buf`, which rumqttd
/// keeps private. Only meaningful once the codec decoded that packet.
pub(crate) fn publish_header(buf: &[u8]) -> Option<(u8, bool, u16)> {
    let (first, topic_at) = fixed_header(buf)?;
    if first >> 4 != 3 {
        return None;
    }
    let (qos, dup) = ((first >> 1) & 0b11, first & 0b1000 != 0);
    let topic_len = usize::from(u16::from_be_bytes([*buf.get(topic_at)?, *buf.get(topic_at + 1)?]));
    let pkid_at = topic_at + 2 + topic_len;
    let pkid = if qos > 0 { u16::from_be_bytes([*buf.get(pkid_at)?, *buf.get(pkid_at + 1)?]) } else { 0 };
    Some((qos, dup, pkid))
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        1 => "CONNECT",
        2 => "CONNACK",
        3 => "PUBLISH",
        4 => "PUBACK",
        5 => "PUBREC",
        6 => "PUBREL",
        7 => "PUBCOMP",
        8 => "SUBSCRIBE",
        9 => "SUBACK",
        10 => "UNSUBSCRIBE",
        11 => "UNSUBACK",
        12 => "PINGREQ",
        13 => "PINGRESP",
        14 => "DISCONNECT",
        _ => "reserved packet type",
    }
}

/// The packet's kind, for logs and refusals: never its fields.
pub(crate) fn name(p: &Packet) -> &'static str {
    kind_name(match p {
        Packet::Connect(..) => 1,
        Packet::ConnAck(..) => 2,
        Packet::Publish(..) => 3,
        Packet::PubAck(..) => 4,
        Packet::PubRec(..) => 5,
        Packet::PubRel(..) => 6,
        Packet::PubComp(..) => 7,
        Packet::Subscribe(..) => 8,
        Packet::SubAck(..) => 9,
        Packet::Unsubscribe(..) => 10,
        Packet::UnsubAck(..) => 11,
        Packet::PingReq(..) => 12,
        Packet::PingResp(..) => 13,
        Packet::Disconnect(..) => 14,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_header_reads_qos_dup_and_pkid() {
        // PUBLISH, DUP=1, QoS 1, topic "a/b", pkid 0x1234, payload "{}".
        let frame = [0x3a, 9, 0, 3, b'a', b'/', b'b', 0x12, 0x34, b'{', b'}'];
        assert_eq!(publish_header(&frame), Some((1, true, 0x1234)));
        let qos0 = [0x30, 7, 0, 3, b'a', b'/', b'b', b'{', b'}'];
        assert_eq!(publish_header(&qos0), Some((0, false, 0)));
        assert_eq!(publish_header(&[0xc0, 0]), None);
    }

    #[test]
    fn wrong_fixed_header_flags_and_the_connect_reserved_bit_are_refused() {
        assert!(check(&[0x82, 5, 0, 1, 0, 1, b'a']).is_ok(), "SUBSCRIBE with 0010");
        assert!(check(&[0x80, 5, 0, 1, 0, 1, b'a']).is_err(), "SUBSCRIBE with 0000");
        assert!(check(&[0xc1, 0]).is_err(), "PINGREQ with a flag");
        assert!(check(&[0x36, 0]).is_err(), "QoS 3");
        let connect = |flags: u8| [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 60, 0, 0];
        assert!(check(&connect(0x02)).is_ok());
        assert!(check(&connect(0x03)).is_err());
        assert!(check(&[0x10]).is_ok(), "too few bytes to tell");
    }
}
