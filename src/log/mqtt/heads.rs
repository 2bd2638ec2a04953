//! Each device's chain head: its newest event with a packet id, where a
//! DUP=1 lookup starts walking back through `events.mqtt_prev`. Kept in
//! memory by the writer, stored with the device counters, and completed
//! from the log's tail after a crash.
//!
//! Guarantees: a head never points at a seq that did not commit (what a
//! rolled-back request or transaction changed is undone), so a seq a
//! failed commit handed out and a later one reused never cuts a chain.

use std::collections::HashMap;

use rusqlite::{Connection, params};

use super::super::Error;

/// Each device's newest event with a packet id: where a DUP=1 lookup starts
/// walking back through `events.mqtt_prev` (see `append::find_redelivered`).
/// Kept here, stored with the device counters, and completed from the
/// log's tail after a crash. Nested maps: looking up by `&str` allocates
/// nothing.
#[derive(Default)]
pub(in crate::log) struct MqttHeads {
    devices: HashMap<String, HashMap<String, Head>>,
    /// What the open transaction changed, oldest first, with the head
    /// before: undone if it does not commit.
    undo: Vec<(String, String, Option<Head>)>,
}

#[derive(Debug, Clone, Copy)]
struct Head {
    seq: i64,
    /// `mqtt_heads` holds this seq.
    stored: bool,
}

impl MqttHeads {
    /// The heads as last stored, completed from the log's tail (those of
    /// events committed after the last store, which a kill lost).
    pub(in crate::log) fn load(conn: &Connection) -> Result<Self, Error> {
        let (stored, upto) = mqtt_heads(conn)?;
        let mut heads = MqttHeads::default();
        for (tenant, device, seq) in stored {
            heads.devices.entry(tenant).or_default().insert(device, Head { seq, stored: true });
        }
        let after = mqtt_heads_after(conn, upto)?;
        if !after.is_empty() {
            tracing::info!(
                devices = after.len(),
                "MQTT redelivery: newest events found again past the last stored ones"
            );
        }
        for (tenant, device, seq) in after {
            heads.devices.entry(tenant).or_default().insert(device, Head { seq, stored: false });
        }
        Ok(heads)
    }

    /// The device's head, if it has one.
    pub(super) fn get(&self, tenant: &str, device: &str) -> Option<i64> {
        Some(self.devices.get(tenant)?.get(device)?.seq)
    }

    /// Moves the device's head to `seq` (undone if the transaction does
    /// not commit).
    pub(super) fn set(&mut self, tenant: &str, device: &str, seq: i64) {
        let head = Head { seq, stored: false };
        if !self.devices.contains_key(tenant) {
            self.devices.insert(tenant.to_owned(), HashMap::new());
        }
        let devices = self.devices.get_mut(tenant).expect("inserted above");
        let before = match devices.get_mut(device) {
            Some(h) => Some(std::mem::replace(h, head)),
            None => devices.insert(device.to_owned(), head),
        };
        self.undo.push((tenant.to_owned(), device.to_owned(), before));
    }

    /// Undoes the changes after the first `keep` (a rolled-back request or
    /// transaction).
    fn undo_to(&mut self, keep: usize) {
        while self.undo.len() > keep {
            let Some((tenant, device, before)) = self.undo.pop() else { break };
            let devices = self.devices.entry(tenant).or_default();
            match before {
                Some(head) => devices.insert(device, head),
                None => devices.remove(&device),
            };
        }
    }

    /// Heads `mqtt_heads` does not hold yet: `(tenant, device, seq)`.
    fn unstored(&self) -> impl Iterator<Item = (&str, &str, i64)> {
        self.devices.iter().flat_map(|(tenant, devices)| {
            devices.iter().filter(|(_, h)| !h.stored).map(move |(device, h)| (tenant.as_str(), device.as_str(), h.seq))
        })
    }

    /// After the commit that stored every head.
    fn mark_stored(&mut self) {
        self.devices.values_mut().flat_map(HashMap::values_mut).for_each(|h| h.stored = true);
    }

    /// At the start of a group's transaction: anything left from a
    /// transaction that failed is undone.
    pub(in crate::log) fn begin(&mut self) {
        self.undo_to(0);
    }

    /// The group's transaction committed (`stored`: with the heads).
    pub(in crate::log) fn committed(&mut self, stored: bool) {
        self.undo.clear();
        if stored {
            self.mark_stored();
        }
    }
}

/// With the device counters (every `DEVICE_FLUSH`, in the group's
/// transaction): stores the heads the table does not hold yet and notes
/// that the process is alive now.
pub(in crate::log) fn store(tx: &Connection, heads: &MqttHeads, now_us: i64) -> Result<(), Error> {
    store_mqtt_heads(tx, heads.unstored())?;
    super::note_alive(tx, now_us)
}

/// `(tenant, device_id, seq)` of a device's event.
pub type DeviceSeq = (String, String, i64);

/// Each device's newest event with a packet id, as last stored, and the seq
/// up to which that is complete.
pub fn mqtt_heads(conn: &Connection) -> Result<(Vec<DeviceSeq>, i64), Error> {
    let heads = conn
        .prepare("SELECT tenant, device_id, seq FROM mqtt_heads")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    let upto =
        conn.query_row("SELECT coalesce((SELECT value FROM meta WHERE key = 'mqtt_heads_upto'), 0)", [], |r| r.get(0))?;
    Ok((heads, upto))
}

/// Each device's newest event with a packet id above `upto`. After a
/// crash, the heads stored last miss these.
pub(super) fn mqtt_heads_after(conn: &Connection, upto: i64) -> Result<Vec<DeviceSeq>, Error> {
    Ok(conn
        .prepare(
            "SELECT tenant, device_id, max(seq) FROM events
             WHERE seq > ?1 AND mqtt_pkid IS NOT NULL GROUP BY tenant, device_id",
        )?
        .query_map([upto], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<Vec<_>, _>>()?)
}

/// Stores device heads and marks them complete up to the log's last seq.
fn store_mqtt_heads<'a>(conn: &Connection, heads: impl Iterator<Item = (&'a str, &'a str, i64)>) -> Result<(), Error> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO mqtt_heads (tenant, device_id, seq) VALUES (?1, ?2, ?3)
         ON CONFLICT (tenant, device_id) DO UPDATE SET seq = excluded.seq",
    )?;
    for (tenant, device, seq) in heads {
        stmt.execute(params![tenant, device, seq])?;
    }
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('mqtt_heads_upto', coalesce((SELECT max(seq) FROM events), 0))
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute([])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rolled-back request or transaction leaves the heads as they were
    /// before it: a head pointing at a seq that was never committed would
    /// be handed out again to another event and cut the device's chain.
    #[test]
    fn heads_changed_by_what_did_not_commit_are_undone() {
        let mut h = MqttHeads::default();
        h.set("acme", "d1", 1);
        h.undo.clear(); // committed
        let keep = h.undo.len();
        h.set("acme", "d1", 2);
        h.set("acme", "d2", 3);
        assert_eq!((h.get("acme", "d1"), h.get("acme", "d2")), (Some(2), Some(3)));
        h.undo_to(keep);
        assert_eq!((h.get("acme", "d1"), h.get("acme", "d2")), (Some(1), None));
        // Within one transaction, a later request's rollback keeps the earlier one's.
        h.set("acme", "d1", 4);
        let keep = h.undo.len();
        h.set("acme", "d1", 5);
        h.undo_to(keep);
        assert_eq!(h.get("acme", "d1"), Some(4));
        h.undo_to(0);
        assert_eq!(h.get("acme", "d1"), Some(1));
        assert_eq!(h.get("globex", "d1"), None, "heads are per tenant");
        // What is stored at a flush: the heads the table does not hold yet.
        assert_eq!(h.unstored().collect::<Vec<_>>(), [("acme", "d1", 1)]);
        h.mark_stored();
        assert_eq!(h.unstored().count(), 0);
        h.set("acme", "d1", 6);
        h.undo_to(0);
        assert_eq!(h.unstored().count(), 0, "an undone change leaves the head stored");
    }
}
