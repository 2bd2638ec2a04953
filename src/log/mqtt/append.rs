//! The append hook: what the writer does with one MQTT publish and its
//! [`Facts`], in the group's transaction. A DUP=1 publish that is the
//! device's previous publish again, or a QoS 2 publish whose packet id its
//! session still holds, is answered with the stored event and writes
//! nothing; otherwise the event is inserted with its MQTT columns (packet
//! id, digest, and its link in the device's chain), the chain head moves,
//! the packet id is held, and the retained message is set, all in the same
//! transaction as the event.

use rusqlite::{Connection, OptionalExtension};
use uuid::Uuid;

use super::super::cmd::DeviceCounts;
use super::super::{Appended, Error, schema};
use super::{Facts, MqttHeads, Redelivery, held_qos2, hold_qos2, set_retained};
use crate::event::Event;

/// Inserts one event with its MQTT columns as seq `*last + 1` (see
/// `schema::insert_event`); `None` when its id is already in the log.
/// `mqtt_prev`: the device's previous event with a packet id, for one that
/// has one (see [`find_redelivered`]).
pub(in crate::log) fn insert_event(
    conn: &Connection,
    e: &Event,
    redelivery: Option<Redelivery>,
    mqtt_prev: Option<i64>,
    last: &mut i64,
) -> Result<Option<i64>, Error> {
    let mut stmt =
        conn.prepare_cached(schema::insert_event_sql!(", mqtt_pkid, mqtt_digest, mqtt_prev", ", ?12, ?13, ?14"))?;
    let (pkid, digest) = (redelivery.map(|r| r.pkid), redelivery.map(|r| r.digest));
    schema::run_insert(&mut stmt, e, None, &[&pkid, &digest, &mqtt_prev], last)
}

/// Appends one publish; counts its new row into `seen`. The outer `Result`
/// fails the group (SQLite error); the inner one is this request's answer.
/// No savepoint: its only refusal (an id owned by another device) writes
/// nothing, and any other error (SQLite, possibly after its row was
/// inserted) fails the group, so nothing is half-stored.
pub(in crate::log) fn append(
    tx: &Connection,
    e: &Event,
    facts: &Facts,
    seen: &mut DeviceCounts,
    heads: &mut MqttHeads,
    last: &mut i64,
) -> Result<Result<Appended, Error>, Error> {
    match append_one(tx, e, facts, seen, heads, last) {
        Err(e) if !matches!(e, Error::IdConflict { .. } | Error::ChildRefused { .. }) => Err(e),
        answer => Ok(answer),
    }
}

fn append_one(
    conn: &Connection,
    e: &Event,
    facts: &Facts,
    seen: &mut DeviceCounts,
    heads: &mut MqttHeads,
    last: &mut i64,
) -> Result<Appended, Error> {
    // A gateway's publish for a child: the child is its own (registered
    // now if new), or the event is refused, writing nothing.
    if let Some(via) = &facts.via {
        schema::child_for_event(conn, &e.tenant, &via.gateway, &e.device_id, via.max_children, e.received_at_us)?;
    }
    // The device's newest event with a packet id, for one that has one.
    let head = facts.redelivery.and_then(|_| heads.get(&e.tenant, &e.device_id));
    if let Some(r) = facts.redelivery.as_ref().filter(|r| r.check)
        && let Some((seq, id)) = find_redelivered(conn, e, r, head)?
    {
        return Ok(Appended { id, seq, duplicate: true });
    }
    let qos2 = facts.qos2.as_ref().zip(facts.redelivery.map(|r| r.pkid));
    if let Some((hold, pkid)) = qos2
        && let Some((seq, id)) = held_qos2(conn, e, hold, pkid)?
    {
        return Ok(Appended { id, seq, duplicate: true });
    }
    match insert_event(conn, e, facts.redelivery, head, last)? {
        Some(seq) => {
            if facts.redelivery.is_some() {
                heads.set(&e.tenant, &e.device_id, seq);
            }
            if let Some((hold, pkid)) = qos2 {
                hold_qos2(conn, e, hold, pkid, seq)?;
            }
            if let Some(topic) = facts.retain_topic.as_deref() {
                // The bytes the device sent (a payload kept wrapped is unwrapped).
                let bytes = crate::payload::original(&e.payload, e.properties.as_deref());
                set_retained(conn, &e.tenant, topic, Some(&bytes), e.received_at_us)?;
            }
            let c = seen.entry((e.tenant.clone(), e.device_id.clone())).or_insert((0, 0));
            c.0 += 1;
            c.1 = c.1.max(e.received_at_us);
            Ok(Appended { id: e.id, seq, duplicate: false })
        }
        None => match schema::owner_of(conn, &e.id)? {
            Some((seq, tenant, device)) if tenant == e.tenant && device == e.device_id => {
                Ok(Appended { id: e.id, seq, duplicate: true })
            }
            _ => Err(Error::IdConflict { index: 0, id: e.id }),
        },
    }
}

/// How far back a DUP=1 publish is compared: the device's last this many
/// events that carried a packet id, received within `REDELIVERY_WINDOW_US`.
const REDELIVERY_EVENTS: i64 = 1000;
/// Ten minutes.
const REDELIVERY_WINDOW_US: i64 = 600_000_000;

/// An earlier copy of a redelivered MQTT publish: `(seq, id)`.
///
/// The rule: a DUP=1 publish is the earlier copy of the device's most recent
/// event that carried the same packet id (among its last
/// `REDELIVERY_EVENTS` with a packet id, received within `REDELIVERY_WINDOW_US`) when that
/// event has the same topic (its event type: tenant and device are the
/// device's own) and the same payload digest. Anything else is stored.
///
/// Why no genuinely new publish matches: DUP=1 says the client is resending
/// a publish it sent before and saw no PUBACK for. If that first attempt
/// reached us, it was stored before anything else could be (acks follow the
/// commit), and the client cannot have used the packet id again since it
/// still awaits that PUBACK: so the most recent event with the id *is* the
/// first attempt, and topic and payload agree. A new publish that merely
/// reuses an old packet id with another topic or payload never matches
/// (the near misses are tested). The one case left is a first attempt lost
/// with a dead connection, whose resend is byte-identical in topic and
/// payload to the device's previous publish under the same packet id within
/// the window: devices that send identical events back to back should give
/// them distinct content (a counter or timestamp).
///
/// The device's events with a packet id form a chain, newest first: `head`
/// (the writer keeps each device's newest in memory) and each row's
/// `mqtt_prev`. The walk stops at the window's edge, at a row no longer in
/// the log (retention, dead letters) or at a row of another device (a seq
/// a failed commit handed out and a later one reused).
pub fn find_redelivered(
    conn: &Connection,
    e: &Event,
    r: &Redelivery,
    head: Option<i64>,
) -> Result<Option<(i64, Uuid)>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, tenant, device_id, event_type, mqtt_pkid, mqtt_digest, received_at, mqtt_prev
         FROM events WHERE seq = ?1",
    )?;
    let mut next = head;
    for _ in 0..REDELIVERY_EVENTS {
        let Some(seq) = next else { break };
        let row = stmt
            .query_row([seq], |row| {
                let id: [u8; 16] = row.get(0)?;
                let (tenant, device, event_type): (String, String, String) = (row.get(1)?, row.get(2)?, row.get(3)?);
                let (pkid, digest): (Option<i64>, Option<i64>) = (row.get(4)?, row.get(5)?);
                let (received, prev): (i64, Option<i64>) = (row.get(6)?, row.get(7)?);
                Ok((Uuid::from_bytes(id), tenant, device, event_type, pkid, digest, received, prev))
            })
            .optional()?;
        let Some((id, tenant, device, event_type, pkid, digest, received, prev)) = row else { break };
        if tenant != e.tenant || device != e.device_id || received < e.received_at_us - REDELIVERY_WINDOW_US {
            break;
        }
        if pkid == Some(i64::from(r.pkid)) {
            let same = event_type == e.event_type && digest == Some(r.digest);
            return Ok(same.then_some((seq, id)));
        }
        next = prev;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::super::super::schema::testing::{event, log, seqs};
    use super::*;
    use crate::event::fnv1a64;

    /// A QoS 1 publish of `acme/<device>` on `topic` with `payload`.
    fn publish(device: &str, topic: &str, payload: &str, pkid: u16, dup: bool) -> (Event, Facts) {
        let mut e = event(device, "site-a");
        e.event_type = topic.into();
        e.payload = payload.into();
        let redelivery = Some(Redelivery { pkid, digest: fnv1a64(payload.as_bytes()), check: dup });
        (e, Facts { redelivery, ..Facts::default() })
    }

    fn store(c: &Connection, heads: &mut MqttHeads, (e, facts): (Event, Facts)) -> Appended {
        append(c, &e, &facts, &mut DeviceCounts::new(), heads, &mut schema::seq_high(c).unwrap()).unwrap().unwrap()
    }

    #[test]
    fn a_dup_finds_its_earlier_copy_and_not_a_near_miss() {
        let c = log();
        let mut heads = MqttHeads::default();
        let first = store(&c, &mut heads, publish("d1", "t", r#"{"a":1}"#, 5, false));
        store(&c, &mut heads, publish("d1", "t", r#"{"b":2}"#, 6, false));
        store(&c, &mut heads, publish("d2", "t", r#"{"a":1}"#, 5, false));
        // The resend of the first, behind a newer publish of its device and
        // one of another device: found, nothing written.
        let again = store(&c, &mut heads, publish("d1", "t", r#"{"a":1}"#, 5, true));
        assert_eq!((again.seq, again.id, again.duplicate), (first.seq, first.id, true));
        assert_eq!(seqs(&c), [1, 2, 3]);
        // Near misses are new events: another payload, another topic, a
        // packet id the device has not used, no DUP flag.
        for near in [
            publish("d1", "t", r#"{"a":2}"#, 5, true),
            publish("d1", "u", r#"{"b":2}"#, 6, true),
            publish("d1", "t", r#"{"a":1}"#, 7, true),
            publish("d2", "t", r#"{"a":1}"#, 5, false),
        ] {
            assert!(!store(&c, &mut heads, near).duplicate);
        }
        assert_eq!(seqs(&c).len(), 7);
    }

    #[test]
    fn the_chain_links_each_device_to_its_previous_publish() {
        let c = log();
        let mut heads = MqttHeads::default();
        for (device, pkid) in [("d1", 1), ("d2", 1), ("d1", 2)] {
            store(&c, &mut heads, publish(device, "t", "{}", pkid, false));
        }
        let (e, _) = publish("d1", "t", "{}", 1, true);
        let r = Redelivery { pkid: 1, digest: fnv1a64(b"{}"), check: true };
        assert_eq!(find_redelivered(&c, &e, &r, heads.get("acme", "d1")).unwrap().map(|(s, _)| s), Some(1));
        assert_eq!(heads.get("acme", "d2"), Some(2));
        // Outside the window, not found.
        let mut late = e.clone();
        late.received_at_us += REDELIVERY_WINDOW_US + 1;
        assert_eq!(find_redelivered(&c, &late, &r, heads.get("acme", "d1")).unwrap(), None);
    }
}
