//! Session expiry: a persistent session whose connection ended waits for
//! its client for its Session Expiry Interval. One timer per waiting
//! session, cancelled by the client's return (a resume) or the session's
//! end, so reconnect churn leaves no task behind; at shutdown the timer
//! just ends (the session stays in the site log and is judged again at the
//! next start).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::MqttDeps;
use super::state::{Lease, Sessions};
use crate::log::MqttOp;

/// Expires the session of `lease` `after` now, unless `waiting` is
/// cancelled first: its mailbox, and its state in the site log (held QoS 2
/// packet ids, subscriptions).
pub(super) fn wait_for_client(
    deps: &MqttDeps,
    lease: Lease,
    after: Duration,
    waiting: CancellationToken,
    shutdown: &CancellationToken,
) {
    let (sessions, log, shutdown) = (deps.sessions.clone(), deps.ingest.log().clone(), shutdown.clone());
    let gauge = super::TimerGauge::new(&deps.metrics);
    deps.tasks.spawn(async move {
        let _gauge = gauge;
        tokio::select! {
            () = tokio::time::sleep(after) => {}
            () = waiting.cancelled() => return,
            () = shutdown.cancelled() => return,
        }
        if !sessions.expire(&lease) {
            return;
        }
        let key = Sessions::key_of(&lease);
        tracing::info!(
            tenant = key.tenant,
            device_id = key.device_id,
            client_id = key.client_id,
            "mqtt session expired"
        );
        let generation = Some(Sessions::generation_of(&lease));
        if let Err(e) = log.mqtt(MqttOp::DropSession { key, generation, session_id: None }).await {
            tracing::warn!(error = %e, "expired session's state not cleared from the site log");
        }
    });
}
