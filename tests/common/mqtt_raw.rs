//! A deliberately small MQTT 3.1.1 client for tests that need control no
//! library gives: chosen packet ids and DUP flags, malformed bytes, abrupt
//! drops. Library clients (rumqttc, mosquitto, paho) cover the normal paths.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// A decoded server packet: type nibble, flags, body.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub body: Vec<u8>,
}

impl Frame {
    /// Packet id of PUBACK / SUBACK / UNSUBACK.
    pub fn pkid(&self) -> u16 {
        u16::from_be_bytes([self.body[0], self.body[1]])
    }
}

pub fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
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
}

pub fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// A will: topic, payload, retain.
pub struct Will<'a>(pub &'a str, pub &'a [u8], pub bool);

impl Raw {
    pub async fn connect_tcp(addr: SocketAddr) -> Self {
        Self { stream: TcpStream::connect(addr).await.unwrap(), buf: Vec::new() }
    }

    /// CONNECT and read CONNACK; returns its return code.
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        user: &str,
        pass: &str,
        keep_alive: u16,
        will: Option<Will<'_>>,
    ) -> (Self, u8) {
        let (c, code, _) = Self::connect_session(addr, client_id, user, pass, keep_alive, will, true).await;
        (c, code)
    }

    /// CONNECT with a chosen clean-session flag; (client, return code, session present).
    pub async fn connect_session(
        addr: SocketAddr,
        client_id: &str,
        user: &str,
        pass: &str,
        keep_alive: u16,
        will: Option<Will<'_>>,
        clean: bool,
    ) -> (Self, u8, bool) {
        let (c, ack) = Self::handshake(addr, &connect_packet(client_id, user, pass, keep_alive, will, clean)).await;
        (c, ack.body[1], ack.body[0] & 1 == 1)
    }

    /// Sends `connect` on a new connection and reads its CONNACK (any version).
    pub async fn handshake(addr: SocketAddr, connect: &[u8]) -> (Self, Frame) {
        let mut c = Self::connect_tcp(addr).await;
        c.send(connect).await;
        let ack = c.read(Duration::from_secs(10)).await.expect("no CONNACK");
        assert_eq!(ack.kind, 2, "expected CONNACK, got {ack:?}");
        (c, ack)
    }
}

/// The bytes of a CONNECT (username + password, optional will, clean flag).
pub fn connect_packet(
    client_id: &str,
    user: &str,
    pass: &str,
    keep_alive: u16,
    will: Option<Will<'_>>,
    clean: bool,
) -> Vec<u8> {
    {
        let mut body = Vec::new();
        string(b"MQTT", &mut body);
        body.push(4);
        let mut flags = 0b1100_0000; // username + password
        if let Some(Will(_, _, retain)) = &will {
            flags |= 0b0000_0100 | (1 << 3); // will, will QoS 1
            if *retain {
                flags |= 0b0010_0000;
            }
        }
        if clean {
            flags |= 0b10;
        }
        body.push(flags);
        body.extend_from_slice(&keep_alive.to_be_bytes());
        string(client_id.as_bytes(), &mut body);
        if let Some(Will(topic, payload, _)) = &will {
            string(topic.as_bytes(), &mut body);
            string(payload, &mut body);
        }
        string(user.as_bytes(), &mut body);
        string(pass.as_bytes(), &mut body);
        frame(0x10, &body)
    }
}

/// The bytes of a PUBLISH.
pub fn publish_packet(topic: &str, payload: &[u8], qos: u8, pkid: u16, dup: bool, retain: bool) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic.as_bytes(), &mut body);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    frame(0x30 | (u8::from(dup) << 3) | (qos << 1) | u8::from(retain), &body)
}

impl Raw {
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// `send`, false once the server has closed or reset the connection.
    pub async fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// PUBLISH with full control of QoS, packet id, DUP and retain.
    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: u8, pkid: u16, dup: bool, retain: bool) {
        let f = publish_packet(topic, payload, qos, pkid, dup, retain);
        // A write may fail if the server already closed: the caller checks reads.
        let _ = self.stream.write_all(&f).await;
    }

    /// SUBSCRIBE (QoS 1 each); the caller reads the SUBACK.
    pub async fn subscribe(&mut self, pkid: u16, filters: &[&str]) {
        let mut body = pkid.to_be_bytes().to_vec();
        for f in filters {
            string(f.as_bytes(), &mut body);
            body.push(1);
        }
        self.send(&frame(0x82, &body)).await;
    }

    pub async fn puback(&mut self, pkid: u16) {
        self.send(&frame(0x40, &pkid.to_be_bytes())).await;
    }

    pub async fn disconnect(&mut self) {
        self.send(&[0xe0, 0]).await;
    }

    /// Next frame, or `None` on EOF / reset / timeout.
    pub async fn read(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(f) = self.parse() {
                return Some(f);
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until a frame of `kind` arrives (others are skipped).
    pub async fn read_kind(&mut self, kind: u8, timeout: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = self.read(left).await?;
            if f.kind == kind {
                return Some(f);
            }
        }
    }

    /// True once the server has closed the connection.
    pub async fn closed(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    fn parse(&mut self) -> Option<Frame> {
        let first = *self.buf.first()?;
        let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
        loop {
            let b = *self.buf.get(i)?;
            len += usize::from(b & 0x7f) * mult;
            mult *= 128;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if self.buf.len() < i + len {
            return None;
        }
        let body = self.buf[i..i + len].to_vec();
        self.buf.drain(..i + len);
        Some(Frame { kind: first >> 4, flags: first & 0x0f, body })
    }
}

/// MQTT 5.0 pieces: properties are written as raw bytes (`prop_*`) and read
/// back by id (`props`).
pub mod v5 {
    use super::{Frame, Raw, frame, remaining_length, string};
    use std::net::SocketAddr;

    pub fn prop_u8(id: u8, v: u8) -> Vec<u8> {
        vec![id, v]
    }
    pub fn prop_u16(id: u8, v: u16) -> Vec<u8> {
        let mut o = vec![id];
        o.extend_from_slice(&v.to_be_bytes());
        o
    }
    pub fn prop_u32(id: u8, v: u32) -> Vec<u8> {
        let mut o = vec![id];
        o.extend_from_slice(&v.to_be_bytes());
        o
    }
    pub fn prop_str(id: u8, v: &str) -> Vec<u8> {
        let mut o = vec![id];
        string(v.as_bytes(), &mut o);
        o
    }
    pub fn user_prop(k: &str, v: &str) -> Vec<u8> {
        let mut o = vec![0x26];
        string(k.as_bytes(), &mut o);
        string(v.as_bytes(), &mut o);
        o
    }

    fn with_props(body: &mut Vec<u8>, props: &[u8]) {
        remaining_length(props.len(), body);
        body.extend_from_slice(props);
    }

    /// A 5.0 CONNECT (username + password, optional will with its properties).
    pub fn connect_packet(
        client_id: &str,
        user: &str,
        pass: &str,
        keep_alive: u16,
        clean: bool,
        props: &[u8],
        will: Option<(&str, &[u8], &[u8])>,
    ) -> Vec<u8> {
        let mut body = Vec::new();
        string(b"MQTT", &mut body);
        body.push(5);
        let mut flags = 0b1100_0000;
        if will.is_some() {
            flags |= 0b0000_0100 | (1 << 3);
        }
        if clean {
            flags |= 0b10;
        }
        body.push(flags);
        body.extend_from_slice(&keep_alive.to_be_bytes());
        with_props(&mut body, props);
        string(client_id.as_bytes(), &mut body);
        if let Some((topic, payload, will_props)) = will {
            with_props(&mut body, will_props);
            string(topic.as_bytes(), &mut body);
            string(payload, &mut body);
        }
        string(user.as_bytes(), &mut body);
        string(pass.as_bytes(), &mut body);
        frame(0x10, &body)
    }

    /// A 5.0 PUBLISH with properties.
    pub fn publish_packet(topic: &str, payload: &[u8], qos: u8, pkid: u16, retain: bool, props: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        string(topic.as_bytes(), &mut body);
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        with_props(&mut body, props);
        body.extend_from_slice(payload);
        frame(0x30 | (qos << 1) | u8::from(retain), &body)
    }

    /// A 5.0 SUBSCRIBE: (filter, options byte) pairs.
    pub fn subscribe_packet(pkid: u16, filters: &[(&str, u8)], props: &[u8]) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        with_props(&mut body, props);
        for (f, opts) in filters {
            string(f.as_bytes(), &mut body);
            body.push(*opts);
        }
        frame(0x82, &body)
    }

    /// An ack (PUBACK 0x40, PUBREC 0x50, PUBREL 0x62, PUBCOMP 0x70) with success.
    pub fn ack_packet(first: u8, pkid: u16) -> Vec<u8> {
        frame(first, &pkid.to_be_bytes())
    }

    impl Raw {
        /// 5.0 CONNECT; returns the client and the CONNACK.
        pub async fn connect_v5(
            addr: SocketAddr,
            client_id: &str,
            user: &str,
            pass: &str,
            keep_alive: u16,
            clean: bool,
            props: &[u8],
        ) -> (Self, Frame) {
            Self::handshake(addr, &connect_packet(client_id, user, pass, keep_alive, clean, props, None)).await
        }
    }

    /// The properties of a 5.0 packet whose property length starts at `at`:
    /// (id, value); strings and binary without their length prefix.
    pub fn props(body: &[u8], mut at: usize) -> Vec<(u8, Vec<u8>)> {
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let b = body[at];
            at += 1;
            len |= usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let end = at + len;
        let mut out = Vec::new();
        while at < end {
            let id = body[at];
            at += 1;
            let n = match id {
                0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
                0x13 | 0x21 | 0x22 | 0x23 => 2,
                0x02 | 0x11 | 0x18 | 0x27 => 4,
                0x0b => body[at..].iter().position(|b| b & 0x80 == 0).unwrap() + 1,
                0x26 => {
                    let k = usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
                    let v = usize::from(u16::from_be_bytes([body[at + 2 + k], body[at + 3 + k]]));
                    4 + k + v
                }
                _ => {
                    let n = usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
                    at += 2;
                    n
                }
            };
            out.push((id, body[at..at + n].to_vec()));
            at += n;
        }
        out
    }

    /// A string property's value.
    pub fn prop_string(props: &[(u8, Vec<u8>)], id: u8) -> Option<String> {
        props.iter().find(|(i, _)| *i == id).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}
