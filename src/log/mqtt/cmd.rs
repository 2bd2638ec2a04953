//! The writer's MQTT commands, and the `LogHandle` calls that send them: a
//! publish appended with its facts, and a change to session state.
//!
//! Guarantees: a publish is one event, appended with its facts in the
//! group's transaction (no savepoint: its only refusal writes nothing);
//! observers get it with its facts only after the commit.

use rusqlite::Connection;

use super::super::cmd::{Command, Ctx, Reply, deliver};
use super::super::{Appended, Committed, Error, LogHandle};
use super::{Facts, MqttOp, append};
use crate::event::{Event, now_us};

/// Appends one MQTT publish with what it records beside its event.
pub(in crate::log) struct AppendMqtt {
    pub(in crate::log) event: Event,
    pub(in crate::log) facts: Box<Facts>,
    pub(in crate::log) reply: Reply<Appended>,
}

impl AppendMqtt {
    pub(in crate::log) fn apply(self, tx: &Connection, cx: &mut Ctx<'_>) -> Result<(), Error> {
        let AppendMqtt { event, facts, reply } = self;
        let size = event.size_hint() as u64;
        if let Some(full) = cx.over_budget(size) {
            cx.g.delivers.push(deliver(reply, Err(full)));
            return Ok(());
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
        cx.g.delivers.push(deliver(reply, result));
        Ok(())
    }
}

/// Applies a change to MQTT session state.
pub(in crate::log) struct ApplyOp {
    pub(in crate::log) op: MqttOp,
    pub(in crate::log) reply: Reply<usize>,
}

impl ApplyOp {
    pub(in crate::log) fn apply(self, tx: &Connection, cx: &mut Ctx<'_>) -> Result<(), Error> {
        cx.g.delivers.push(deliver(self.reply, self.op.apply(tx, now_us())));
        Ok(())
    }
}

impl LogHandle {
    /// Appends one MQTT publish and, in the same transaction, what its
    /// facts record (redelivery chain, QoS 2 hold, retained message);
    /// answers after the commit.
    pub async fn append_mqtt(&self, event: Event, facts: Box<Facts>) -> Result<Appended, Error> {
        self.call(|reply| Command::AppendMqtt(AppendMqtt { event, facts, reply })).await
    }

    /// Records MQTT session state; answers after the commit.
    pub async fn mqtt(&self, op: MqttOp) -> Result<usize, Error> {
        self.call(|reply| Command::Mqtt(ApplyOp { op, reply })).await
    }
}
