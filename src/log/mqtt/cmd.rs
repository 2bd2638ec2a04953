//! The writer's MQTT commands, and the `LogHandle` calls that send them: a
//! publish appended with its facts, and a change to session state.
//!
//! Guarantees: a publish is one event, appended with its facts in the
//! group's transaction (no savepoint: its only refusal writes nothing); a
//! connection's publishes read together travel as one command, each
//! answered on its own;
//! observers get it with its facts only after the commit.

use rusqlite::Connection;

use super::super::cmd::{Command, Ctx, Reply, deliver};
use super::super::{Appended, Committed, Error, LogHandle};
use super::{Facts, MqttOp, append};
use crate::event::{Event, now_us};

/// Appends MQTT publishes (one connection's, in the order read), each with
/// what it records beside its event. Each is its own request: one refused
/// (the log's budget, an id of another device) takes no other with it.
pub(in crate::log) struct AppendMqtt {
    pub(in crate::log) events: Vec<(Event, Box<Facts>)>,
    pub(in crate::log) reply: Reply<Vec<Result<Appended, Error>>>,
}

impl AppendMqtt {
    pub(in crate::log) fn apply(self, tx: &Connection, cx: &mut Ctx<'_>) -> Result<(), Error> {
        let AppendMqtt { events, reply } = self;
        let mut answers = Vec::with_capacity(events.len());
        for (event, facts) in events {
            answers.push(append_one(tx, cx, event, facts)?);
        }
        cx.g.delivers.push(deliver(reply, Ok(answers)));
        Ok(())
    }
}

/// One publish of an [`AppendMqtt`]: its answer, or the group's failure.
fn append_one(
    tx: &Connection,
    cx: &mut Ctx<'_>,
    event: Event,
    facts: Box<Facts>,
) -> Result<Result<Appended, Error>, Error> {
    let size = event.size_hint() as u64;
    if let Some(full) = cx.over_budget(size) {
        return Ok(Err(full));
    }
    let result = append(tx, &event, &facts, &mut cx.g.seen, cx.heads, &mut cx.g.last_seq)?;
    if let Ok(a) = &result {
        cx.projected += size;
        if !a.duplicate {
            cx.g.appended(event.size_hint());
            if cx.observed {
                cx.g.new_events.push(Committed { seq: a.seq, event, mqtt: Some(facts) });
            }
        }
    }
    Ok(result)
}

/// Applies a change to MQTT session state, and the device's presence
/// with it when the change brings it online (one command per CONNECT).
pub(in crate::log) struct ApplyOp {
    pub(in crate::log) op: MqttOp,
    /// (tenant, device): online from this change on.
    pub(in crate::log) online: Option<(String, String)>,
    pub(in crate::log) reply: Reply<usize>,
}

impl ApplyOp {
    pub(in crate::log) fn apply(self, tx: &Connection, cx: &mut Ctx<'_>) -> Result<(), Error> {
        let now = now_us();
        let mut r = self.op.apply(tx, now);
        if let (Ok(_), Some((tenant, device_id))) = (&r, self.online) {
            match crate::log::schema::set_presence(tx, &tenant, &device_id, true, now) {
                Ok(_) => cx.g.presence.push((tenant, device_id, true)),
                Err(e) => r = Err(e),
            }
        }
        cx.g.delivers.push(deliver(self.reply, r));
        Ok(())
    }
}

impl LogHandle {
    /// Appends MQTT publishes and, in the same transaction, what each one's
    /// facts record (redelivery chain, QoS 2 hold, retained message);
    /// answers each after the commit, in order.
    pub async fn append_mqtt(&self, events: Vec<(Event, Box<Facts>)>) -> Result<Vec<Result<Appended, Error>>, Error> {
        self.call(|reply| Command::AppendMqtt(AppendMqtt { events, reply })).await
    }

    /// Records MQTT session state; answers after the commit.
    pub async fn mqtt(&self, op: MqttOp) -> Result<usize, Error> {
        self.call(|reply| Command::Mqtt(ApplyOp { op, online: None, reply })).await
    }

    /// [`mqtt`](Self::mqtt), and the device online (MQTT presence) in the
    /// same transaction: a CONNECT's one trip to the writer.
    pub async fn mqtt_online(&self, op: MqttOp, tenant: String, device_id: String) -> Result<usize, Error> {
        self.call(|reply| Command::Mqtt(ApplyOp { op, online: Some((tenant, device_id)), reply })).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::Redelivery;
    use super::*;
    use crate::log::schema::testing::event;

    /// A writer over a fresh log file of `max_bytes`.
    fn writer(dir: &std::path::Path, max_bytes: u64) -> (LogHandle, crate::log::writer::WriterThread) {
        let conn = crate::log::open_and_migrate(&dir.join("log.db")).unwrap();
        let config = crate::log::WriterConfig {
            max_bytes,
            remote_max_bytes: 0,
            site_id: "site-a".into(),
            commit_max_rows: 1000,
            commit_max_bytes: 1 << 20,
            commit_delay: Duration::ZERO,
            queue_capacity: 16,
            write_budget: 0,
            max_commit_delay: Duration::ZERO,
        };
        let metrics = Arc::new(crate::metrics::Metrics::new());
        crate::log::writer::spawn(conn, config, metrics, Arc::default(), Vec::new()).unwrap()
    }

    fn publish(device: &str, pkid: u16) -> (Event, Box<Facts>) {
        let redelivery = Some(Redelivery { pkid, digest: 1, check: false });
        (event(device, "site-a"), Box::new(Facts { redelivery, ..Facts::default() }))
    }

    /// A connection's publishes travel together but are answered one by
    /// one: a refused one (an id of another device, the log's budget)
    /// takes none of the others with it, and the rest are stored in order.
    #[tokio::test]
    async fn publishes_sent_together_are_each_answered_on_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let (log, thread) = writer(dir.path(), u64::MAX);
        let first = publish("d1", 1);
        let mut stolen = publish("d2", 1);
        stolen.0.id = first.0.id; // d1's id, sent by d2
        let answers = log.append_mqtt(vec![first, stolen, publish("d1", 2)]).await.unwrap();
        assert!(matches!(answers[1], Err(Error::IdConflict { .. })), "{answers:?}");
        let seqs: Vec<i64> = [&answers[0], &answers[2]].iter().map(|a| a.as_ref().unwrap().seq).collect();
        assert_eq!(seqs, [1, 2], "the others stored, in order");
        drop(log);
        thread.join();

        // A budget with room for about two events: the third is refused
        // as full, the first two are stored.
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::log::open_and_migrate(&dir.path().join("probe.db")).unwrap();
        let used = crate::log::schema::used_bytes(&conn).unwrap();
        let size = event("d1", "site-a").size_hint() as u64;
        let (log, thread) = writer(dir.path(), used + 2 * size + size / 2);
        let answers = log.append_mqtt(vec![publish("d1", 1), publish("d1", 2), publish("d1", 3)]).await.unwrap();
        assert!(answers[0].is_ok() && answers[1].is_ok(), "{answers:?}");
        assert!(matches!(answers[2], Err(Error::Full { .. })), "{answers:?}");
        drop(log);
        thread.join();
    }
}
