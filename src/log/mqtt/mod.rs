//! Everything the site log keeps for MQTT, behind one interface: the facts
//! a publish carries to the log beside its event ([`Facts`]), what the
//! writer does with them in the event's own transaction (`append`: the
//! redelivery chain, QoS 2 holds, retained messages, the insert with the
//! MQTT columns), each device's chain head (`heads`), the writer commands
//! (`cmd`), and session state kept so that what a CONNACK says about a
//! session holds across restarts and kills: sessions (one row per live
//! connection or persistent session waiting for its client), the QoS 2
//! packet ids they hold until PUBREL, and retained messages. No other part
//! of the log knows MQTT.
//!
//! Invariants:
//! - Everything is keyed by (tenant, device, client id): no device can
//!   read, release or wipe another device's state, whatever client ids
//!   they choose.
//! - Held QoS 2 ids belong to a session row and go with it: a session that
//!   ends (expiry 0 at its end, its expiry elapsed, a clean start, evicted)
//!   leaves nothing a later session could mistake for its own.
//! - A session row carries the generation of the connection that owns it;
//!   an older connection ending after a newer one took the client id over
//!   changes nothing.
//! - At start, sessions whose expiry elapsed while the appliance was down
//!   (and those that ended with the process, expiry 0) are dropped with
//!   their held ids.
//! - A publish and its facts (its hold, its retained message, its chain
//!   link) commit together or not at all: an ack and its session state are
//!   durable together.

mod append;
mod cmd;
mod heads;

use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use super::Error;
use crate::event::Event;

pub(super) use append::append;
pub use append::find_redelivered;
pub(super) use cmd::{AppendMqtt, ApplyOp};
pub use heads::{DeviceSeq, mqtt_heads};
pub(super) use heads::{MqttHeads, store};

/// What the MQTT front-end records with a publish, in the same transaction
/// as its event, so an ack and its session state are durable together.
/// It travels beside the event (`LogHandle::append_mqtt`) and comes back
/// with it to the commit observers (`log::Committed`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Facts {
    /// QoS 1 and 2: the packet id and payload digest, for redelivery
    /// detection.
    pub redelivery: Option<Redelivery>,
    /// QoS 2: whose packet id, `redelivery.pkid`, stays held until its
    /// PUBREL. A PUBLISH with a held packet id is the same message again
    /// and is not stored twice.
    pub qos2: Option<Qos2Hold>,
    /// RETAIN=1: the stream topic whose retained message this event becomes.
    pub retain_topic: Option<String>,
    /// How the MQTT fan-out passes it on (publish QoS, RETAIN, origin
    /// session, 5.0 properties); events without it go out like QoS 1.
    pub published: Option<Published>,
    /// The event is a child's, published by its gateway: checked in the
    /// event's transaction (and registered under the gateway when the id is
    /// new, within its bound).
    pub via: Option<Via>,
}

/// A gateway publishing for a child (see [`Facts::via`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    pub gateway: String,
    /// `mqtt.gateway_max_children`.
    pub max_children: usize,
}

/// What identifies an MQTT QoS 1 publish for redelivery detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redelivery {
    pub pkid: u16,
    /// FNV-1a 64 of the payload (`event::fnv1a64`; stable across versions:
    /// it is stored).
    pub digest: i64,
    /// DUP=1: look for an earlier copy before writing.
    pub check: bool,
}

/// The session a QoS 2 packet id is held in: the device's client id, and
/// the session of it (a new session of the same client id holds nothing
/// of an older one's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qos2Hold {
    /// The session's device: the publisher's, or for a child's event the
    /// gateway's (the event is the child's, the packet id the gateway's).
    pub device_id: String,
    pub client_id: String,
    pub session_id: u64,
}

/// What MQTT subscribers get of a publish besides its topic and payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    pub qos: u8,
    pub retain: bool,
    /// The publishing session's mailbox id, for No Local (0: none).
    pub origin: u64,
    pub props: Option<rumqttd::protocol::PublishProperties>,
}

/// Whose session state: a client id of one device of one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub tenant: String,
    pub device_id: String,
    pub client_id: String,
}

/// A session the log holds, as read at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub key: SessionKey,
    /// The connection that owned it last.
    pub generation: u64,
    /// The session itself (kept across its resumes).
    pub session_id: u64,
    /// Seconds after `ended_at_us` the session expires.
    pub expiry: u32,
    pub ended_at_us: i64,
    /// The front-end's encoding of the session's subscriptions.
    pub subscriptions: String,
}

/// A change to MQTT state, applied in the writer's transaction.
#[derive(Debug, Clone)]
pub enum MqttOp {
    /// A connection (`generation`) starts session `session_id`, or resumes
    /// it (`resume`); a new session drops any ids the client id still held.
    OpenSession { key: SessionKey, generation: u64, session_id: u64, expiry: u32, resume: bool },
    /// The connection of `generation` ended: with expiry 0 the session
    /// ends with it, else it waits `expiry` seconds for its client.
    EndSession { key: SessionKey, generation: u64, expiry: u32 },
    /// The session ended: expired (the row of its last connection,
    /// `generation`), or evicted (the row of session `session_id`); both
    /// `None`: whatever the client id holds.
    DropSession { key: SessionKey, generation: Option<u64>, session_id: Option<u64> },
    /// A persistent session's subscriptions changed.
    Subscriptions { key: SessionKey, generation: u64, encoded: String },
    /// PUBREL: the QoS 2 packet id may be used for a new message again
    /// (only in the session that holds it).
    Release { key: SessionKey, session_id: u64, pkid: u16 },
    /// A zero-byte retained publish: the topic keeps no retained message.
    ClearRetained { tenant: String, topic: String },
}

impl MqttOp {
    /// Applies the change; the count is what it touched (for `Release`, 0
    /// when the packet id was not held).
    pub(super) fn apply(self, conn: &Connection, now_us: i64) -> Result<usize, Error> {
        match self {
            MqttOp::OpenSession { key, generation, session_id, expiry, resume } => {
                open_session(conn, &key, (generation, session_id), expiry, resume)
            }
            MqttOp::EndSession { key, generation, expiry } => end_session(conn, &key, generation, expiry, now_us),
            MqttOp::DropSession { key, generation, session_id } => drop_session(conn, &key, generation, session_id),
            MqttOp::Subscriptions { key, generation, encoded } => Ok(conn
                .prepare_cached(
                    "UPDATE mqtt_sessions SET subscriptions = ?4
                     WHERE tenant = ?1 AND device_id = ?2 AND client_id = ?3 AND generation = ?5",
                )?
                .execute(params![key.tenant, key.device_id, key.client_id, encoded, generation as i64])?),
            MqttOp::Release { key, session_id, pkid } => Ok(conn
                .prepare_cached(
                    "DELETE FROM mqtt_qos2 WHERE tenant = ?1 AND device_id = ?2 AND client_id = ?3 AND pkid = ?4
                       AND session_id = ?5",
                )?
                .execute(params![key.tenant, key.device_id, key.client_id, pkid, session_id as i64])?),
            MqttOp::ClearRetained { tenant, topic } => set_retained(conn, &tenant, &topic, None, 0),
        }
    }
}

fn drop_holds(conn: &Connection, key: &SessionKey) -> Result<usize, Error> {
    Ok(conn
        .prepare_cached("DELETE FROM mqtt_qos2 WHERE tenant = ?1 AND device_id = ?2 AND client_id = ?3")?
        .execute(params![key.tenant, key.device_id, key.client_id])?)
}

fn open_session(
    conn: &Connection,
    key: &SessionKey,
    (generation, session_id): (u64, u64),
    expiry: u32,
    resume: bool,
) -> Result<usize, Error> {
    if !resume {
        drop_holds(conn, key)?;
    }
    Ok(conn
        .prepare_cached(
            "INSERT INTO mqtt_sessions (tenant, device_id, client_id, generation, session_id, expiry, ended_at,
                                        subscriptions)
             VALUES (?1, ?2, ?3, ?4, ?7, ?5, NULL, '')
             ON CONFLICT (tenant, device_id, client_id) DO UPDATE SET
               generation = excluded.generation, session_id = excluded.session_id, expiry = excluded.expiry,
               ended_at = NULL, subscriptions = CASE WHEN ?6 THEN subscriptions ELSE '' END",
        )?
        .execute(params![
            key.tenant,
            key.device_id,
            key.client_id,
            generation as i64,
            expiry,
            resume,
            session_id as i64
        ])?)
}

fn end_session(conn: &Connection, key: &SessionKey, generation: u64, expiry: u32, now_us: i64) -> Result<usize, Error> {
    if expiry == 0 {
        return drop_session(conn, key, Some(generation), None);
    }
    Ok(conn
        .prepare_cached(
            "UPDATE mqtt_sessions SET expiry = ?4, ended_at = ?5
             WHERE tenant = ?1 AND device_id = ?2 AND client_id = ?3 AND generation = ?6",
        )?
        .execute(params![key.tenant, key.device_id, key.client_id, expiry, now_us, generation as i64])?)
}

/// Drops the session row (only the one of `generation` / `session_id`,
/// when given) and, when it went, the ids it held.
fn drop_session(
    conn: &Connection,
    key: &SessionKey,
    generation: Option<u64>,
    session_id: Option<u64>,
) -> Result<usize, Error> {
    let n = conn
        .prepare_cached(
            "DELETE FROM mqtt_sessions WHERE tenant = ?1 AND device_id = ?2 AND client_id = ?3
               AND (?4 IS NULL OR generation = ?4) AND (?5 IS NULL OR session_id = ?5)",
        )?
        .execute(params![
            key.tenant,
            key.device_id,
            key.client_id,
            generation.map(|g| g as i64),
            session_id.map(|s| s as i64)
        ])?;
    if n > 0 || (generation.is_none() && session_id.is_none()) {
        drop_holds(conn, key)?;
    }
    Ok(n)
}

/// At start, before any connection: sessions the process held when it
/// stopped end when it was last known alive (`meta.alive_at`, stored with
/// the device counters, else `now_us`); those with expiry 0, or whose
/// expiry has elapsed, are dropped with their held ids (and so are ids no
/// session holds); expiries are held to `max_expiry`. Returns the sessions
/// left.
pub fn start_sessions(conn: &Connection, now_us: i64, max_expiry: u32) -> Result<Vec<StoredSession>, Error> {
    conn.execute(
        "UPDATE mqtt_sessions SET ended_at = min(?1, coalesce((SELECT value FROM meta WHERE key = 'alive_at'), ?1))
         WHERE ended_at IS NULL",
        [now_us],
    )?;
    conn.execute("UPDATE mqtt_sessions SET expiry = ?1 WHERE expiry > ?1", [max_expiry])?;
    conn.execute("DELETE FROM mqtt_sessions WHERE expiry = 0 OR ended_at + expiry * 1000000 <= ?1", [now_us])?;
    conn.execute(
        "DELETE FROM mqtt_qos2 WHERE NOT EXISTS (SELECT 1 FROM mqtt_sessions s
           WHERE s.tenant = mqtt_qos2.tenant AND s.device_id = mqtt_qos2.device_id
             AND s.client_id = mqtt_qos2.client_id AND s.session_id = mqtt_qos2.session_id)",
        [],
    )?;
    let mut stmt = conn.prepare(
        "SELECT tenant, device_id, client_id, generation, session_id, expiry, ended_at, subscriptions
         FROM mqtt_sessions ORDER BY ended_at, generation",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(StoredSession {
            key: SessionKey { tenant: r.get(0)?, device_id: r.get(1)?, client_id: r.get(2)? },
            generation: r.get::<_, i64>(3)?.max(0) as u64,
            session_id: r.get::<_, i64>(4)?.max(0) as u64,
            expiry: r.get(5)?,
            ended_at_us: r.get(6)?,
            subscriptions: r.get(7)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The event already stored for a QoS 2 packet id the client's session
/// still holds.
pub(super) fn held_qos2(
    conn: &Connection,
    e: &Event,
    hold: &Qos2Hold,
    pkid: u16,
) -> Result<Option<(i64, Uuid)>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, id FROM mqtt_qos2 WHERE tenant = ?1 AND device_id = ?2 AND client_id = ?3 AND pkid = ?4
           AND session_id = ?5",
    )?;
    Ok(stmt
        .query_row(params![e.tenant, hold.device_id, hold.client_id, pkid, hold.session_id as i64], |r| {
            let id: [u8; 16] = r.get(1)?;
            Ok((r.get(0)?, Uuid::from_bytes(id)))
        })
        .optional()?)
}

/// Holds a QoS 2 packet id of the event's device until its PUBREL, in
/// the session that is the client id's now: a connection superseded by a
/// new session holds nothing (its event is stored, its PUBREC goes to a
/// connection that is ending).
pub(super) fn hold_qos2(conn: &Connection, e: &Event, hold: &Qos2Hold, pkid: u16, seq: i64) -> Result<(), Error> {
    let mut stmt = conn.prepare_cached(
        "INSERT OR REPLACE INTO mqtt_qos2 (tenant, device_id, client_id, pkid, session_id, seq, id, received_at)
         SELECT ?1, ?2, ?3, ?4, ?8, ?5, ?6, ?7 WHERE EXISTS (SELECT 1 FROM mqtt_sessions
           WHERE tenant = ?1 AND device_id = ?2 AND client_id = ?3 AND session_id = ?8)",
    )?;
    stmt.execute(params![
        e.tenant,
        hold.device_id,
        hold.client_id,
        pkid,
        seq,
        e.id.as_bytes(),
        e.received_at_us,
        hold.session_id as i64
    ])?;
    Ok(())
}

/// Notes that the process is alive now (with the device counters, every
/// 10 s while it commits): a session connected when it died ends then.
pub(super) fn note_alive(conn: &Connection, now_us: i64) -> Result<(), Error> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('alive_at', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute([now_us])?;
    Ok(())
}

/// Sets (`Some`) or clears (`None`) the retained message of a stream topic.
pub(super) fn set_retained(
    conn: &Connection,
    tenant: &str,
    topic: &str,
    payload: Option<&[u8]>,
    now_us: i64,
) -> Result<usize, Error> {
    Ok(match payload {
        Some(p) => conn
            .prepare_cached(
                "INSERT INTO mqtt_retained (tenant, topic, payload, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (tenant, topic) DO UPDATE SET payload = excluded.payload, updated_at = excluded.updated_at",
            )?
            .execute(params![tenant, topic, p, now_us])?,
        None => conn
            .prepare_cached("DELETE FROM mqtt_retained WHERE tenant = ?1 AND topic = ?2")?
            .execute(params![tenant, topic])?,
    })
}

/// Every retained message: `(tenant, topic, payload)`, oldest first.
pub fn retained(conn: &Connection) -> Result<Vec<(String, String, Vec<u8>)>, Error> {
    let mut stmt = conn.prepare("SELECT tenant, topic, payload FROM mqtt_retained ORDER BY updated_at")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::super::schema::testing::{event, log};
    use super::*;

    fn key(device: &str, client: &str) -> SessionKey {
        SessionKey { tenant: "acme".into(), device_id: device.into(), client_id: client.into() }
    }

    /// An event of the key's device, held as `pkid` by `session_id`.
    fn hold_in(c: &Connection, k: &SessionKey, session_id: u64, pkid: u16) {
        let e = Event { tenant: k.tenant.clone(), ..event(&k.device_id, "site-a") };
        let hold = Qos2Hold { device_id: k.device_id.clone(), client_id: k.client_id.clone(), session_id };
        hold_qos2(c, &e, &hold, pkid, 1).unwrap();
    }

    /// Holds `pkid` in whatever session the key has now.
    fn hold(c: &Connection, k: &SessionKey, pkid: u16) {
        hold_in(c, k, session_of(c, k), pkid);
    }

    fn session_of(c: &Connection, k: &SessionKey) -> u64 {
        c.query_row(
            "SELECT session_id FROM mqtt_sessions WHERE tenant = ?1 AND device_id = ?2 AND client_id = ?3",
            params![k.tenant, k.device_id, k.client_id],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as u64
    }

    fn holds(c: &Connection) -> Vec<(String, String, u16)> {
        let mut s = c.prepare("SELECT device_id, client_id, pkid FROM mqtt_qos2 ORDER BY 1, 2, 3").unwrap();
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(Result::unwrap).collect()
    }

    /// Connection `generation` opens (or resumes) a session; a new one has
    /// session id = its generation.
    fn open(c: &Connection, k: &SessionKey, generation: u64, expiry: u32, resume: bool) {
        let session_id = if resume { session_of(c, k) } else { generation };
        MqttOp::OpenSession { key: k.clone(), generation, session_id, expiry, resume }.apply(c, 0).unwrap();
    }

    #[test]
    fn a_device_never_touches_another_devices_state_under_the_same_client_id() {
        let c = log();
        let (theirs, mine) = (key("pump-1-x", "pump-1-x"), key("pump-1", "pump-1-x"));
        open(&c, &theirs, 1, 0, false);
        hold(&c, &theirs, 5);
        open(&c, &mine, 2, 0, false); // a clean start of the other device's client id
        hold(&c, &mine, 5);
        MqttOp::Release { key: mine.clone(), session_id: 2, pkid: 5 }.apply(&c, 0).unwrap();
        MqttOp::EndSession { key: mine, generation: 2, expiry: 0 }.apply(&c, 0).unwrap();
        assert_eq!(holds(&c), [("pump-1-x".into(), "pump-1-x".into(), 5)]);
    }

    #[test]
    fn held_ids_live_exactly_as_long_as_their_session() {
        let c = log();
        let k = key("d1", "d1");
        // Expiry 0: the ids end with the connection.
        open(&c, &k, 1, 0, false);
        hold(&c, &k, 1);
        MqttOp::EndSession { key: k.clone(), generation: 1, expiry: 0 }.apply(&c, 10).unwrap();
        assert!(holds(&c).is_empty());
        // A persistent session keeps them while it waits, a resume keeps them,
        // a new session (no resume) drops them.
        open(&c, &k, 2, 60, false);
        hold(&c, &k, 1);
        MqttOp::EndSession { key: k.clone(), generation: 2, expiry: 60 }.apply(&c, 10).unwrap();
        open(&c, &k, 3, 60, true);
        assert_eq!(holds(&c).len(), 1);
        open(&c, &k, 4, 60, false);
        assert!(holds(&c).is_empty());
        // An older connection ending after a take-over, and an older session
        // evicted after it, change nothing.
        hold(&c, &k, 2);
        MqttOp::EndSession { key: k.clone(), generation: 3, expiry: 0 }.apply(&c, 10).unwrap();
        MqttOp::DropSession { key: k.clone(), generation: Some(3), session_id: None }.apply(&c, 10).unwrap();
        MqttOp::DropSession { key: k.clone(), generation: None, session_id: Some(2) }.apply(&c, 10).unwrap();
        assert_eq!(holds(&c).len(), 1);
        MqttOp::DropSession { key: k, generation: Some(4), session_id: None }.apply(&c, 10).unwrap();
        assert!(holds(&c).is_empty());
    }

    #[test]
    fn a_superseded_session_holds_finds_and_releases_nothing_in_the_new_one() {
        let c = log();
        let k = key("d1", "d1");
        open(&c, &k, 1, 0, false); // session 1
        open(&c, &k, 2, 0, false); // a clean start: session 2
        hold_in(&c, &k, 1, 5); // session 1's connection commits its held publish late
        assert!(holds(&c).is_empty(), "nothing held for the new session");
        hold_in(&c, &k, 2, 5);
        let e = |device: &str| event(device, "site-a");
        let old = Qos2Hold { device_id: "d1".into(), client_id: "d1".into(), session_id: 1 };
        let new = Qos2Hold { device_id: "d1".into(), client_id: "d1".into(), session_id: 2 };
        assert!(held_qos2(&c, &e("d1"), &old, 5).unwrap().is_none(), "session 1 matches nothing of session 2");
        assert!(held_qos2(&c, &e("d1"), &new, 5).unwrap().is_some());
        MqttOp::Release { key: k.clone(), session_id: 1, pkid: 5 }.apply(&c, 0).unwrap();
        assert_eq!(holds(&c).len(), 1, "nor releases it");
        MqttOp::Release { key: k, session_id: 2, pkid: 5 }.apply(&c, 0).unwrap();
        assert!(holds(&c).is_empty());
    }

    #[test]
    fn an_upgraded_log_keeps_its_held_ids_under_the_device_that_stored_them() {
        let mut c = Connection::open_in_memory().unwrap();
        super::super::schema::migrations().to_version(&mut c, 8).unwrap();
        c.execute_batch(
            "INSERT INTO events (seq, id, tenant, device_id, event_type, payload, ts, received_at, origin_site)
               VALUES (41, x'01', 'acme', 'pump-1', 't', '{}', 0, 0, 'site-a');
             INSERT INTO dead_letter (seq, id, tenant, device_id, event_type, payload, ts, received_at, origin_site,
                                      error, failed_at)
               VALUES (39, x'03', 'acme', 'pump-2', 't', '{}', 0, 0, 'site-a', 'no', 0);
             INSERT INTO mqtt_qos2 (tenant, client_id, pkid, seq, id, received_at)
               VALUES ('acme', 'pump-1-x', 5, 41, x'01', 0),
                      ('acme', 'gone', 6, 40, x'02', 0),
                      ('acme', 'pump-2', 7, 39, x'03', 0);",
        )
        .unwrap();
        super::super::schema::migrate(&mut c).unwrap();
        assert_eq!(
            holds(&c),
            [("pump-1".into(), "pump-1-x".into(), 5), ("pump-2".into(), "pump-2".into(), 7)],
            "an id whose event is gone is dropped; one moved to dead letters is kept"
        );
        let left = start_sessions(&c, crate::event::now_us(), 86_400).unwrap();
        assert_eq!(left.len(), 2, "their sessions wait a day for their clients");
        assert_eq!((left[0].expiry, left[1].expiry), (86_400, 86_400));
        assert_eq!(holds(&c).len(), 2, "and keep their ids");
    }

    #[test]
    fn a_start_drops_what_ended_with_the_process_or_expired_while_down() {
        let c = log();
        let s = 1_000_000;
        let (live0, live60, waiting, expired) = (key("d1", "a"), key("d1", "b"), key("d1", "c"), key("d1", "d"));
        open(&c, &live0, 1, 0, false); // connected when the process died, expiry 0
        open(&c, &live60, 2, 60, false); // connected, persistent
        open(&c, &waiting, 3, 60, false);
        MqttOp::EndSession { key: waiting.clone(), generation: 3, expiry: 60 }.apply(&c, 100 * s).unwrap();
        open(&c, &expired, 4, 60, false);
        MqttOp::EndSession { key: expired.clone(), generation: 4, expiry: 60 }.apply(&c, 10 * s).unwrap();
        for k in [&live0, &live60, &waiting, &expired] {
            hold(&c, k, 7);
        }
        // The process was last known alive at 90 s; it restarts at 100 s.
        note_alive(&c, 90 * s).unwrap();
        let left = start_sessions(&c, 100 * s, 30).unwrap();
        let kept: Vec<_> = left.iter().map(|s| (s.key.client_id.as_str(), s.expiry, s.ended_at_us)).collect();
        assert_eq!(kept, [("b", 30, 90 * s), ("c", 30, 100 * s)], "ended when last alive, held to the maximum expiry");
        let clients: Vec<_> = holds(&c).into_iter().map(|(_, c, _)| c).collect();
        assert_eq!(clients, ["b", "c"]);
    }
}
