//! The will: stored as an event of the device (so it must be on its own
//! event topic) and passed on to subscribers, when a connection ends
//! without DISCONNECT (or with 5.0's 0x04).
//!
//! A 5.0 Will Delay is a timer, not a parked connection: the connection
//! ends and frees its slot; the timer (one per session, tracked for
//! shutdown) fires the will after the delay, unless the client came back
//! first. When it fires it checks again that the device may still publish
//! (not revoked, token not expired). A will counts against the device's
//! rate limits like any publish: over one it waits, at most `WILL_WAIT`.

use std::time::{Duration, Instant};

use futures_util::FutureExt;
use rumqttd::protocol::{LastWill, LastWillProperties, PublishProperties};
use tokio_util::sync::CancellationToken;

use super::super::acl::stream_topic;
use super::super::state::Lease;
use super::super::topic_map::Resolved;
use super::Identity;
use crate::event::EventInput;
use crate::log::mqtt::{Facts, Published};
use crate::mqtt::MqttDeps;

/// Longest a will waits for the device's rate limit to allow it.
const WILL_WAIT: Duration = Duration::from_secs(60);

/// The will a session fires on an unclean end: its message, 5.0
/// properties, and how long it waits first (Will Delay Interval).
pub(super) struct Will {
    pub message: LastWill,
    pub props: Option<LastWillProperties>,
    pub delay: Duration,
}

/// Fires the will, after its delay if it has one: on a task of its own
/// (tracked, so shutdown waits for it), so the connection's slot is free at
/// once. `waiting` is cancelled when the client comes back or the session
/// ends otherwise.
pub(super) fn fire_or_schedule(
    deps: &MqttDeps,
    who: &Identity,
    lease: &Lease,
    will: Will,
    waiting: Option<CancellationToken>,
    shutdown: &CancellationToken,
) {
    let origin = lease.mailbox.id;
    let (deps, who, lease, shutdown) = (deps.clone(), who.clone(), lease.clone(), shutdown.clone());
    let gauge = (!will.delay.is_zero()).then(|| crate::mqtt::TimerGauge::new(&deps.metrics));
    deps.tasks.clone().spawn(async move {
        if !will.delay.is_zero() {
            // No token: a newer connection had the client id already.
            let waiting = waiting.unwrap_or_default();
            tokio::select! {
                () = tokio::time::sleep(will.delay) => {}
                // The appliance stops: the will goes now, while it still can.
                () = shutdown.cancelled() => {}
                // The client came back, or the session ended first (evicted,
                // expired): then its will goes now.
                () = waiting.cancelled() => {}
            }
            if deps.sessions.resumed(&lease) {
                tracing::info!(
                    device_id = who.device_id,
                    "will not published: the client reconnected within its will delay"
                );
                return;
            }
            if let Some(why) = deps.auth.session_end(&who.principal, who.expires_at).now_or_never() {
                tracing::info!(
                    device_id = who.device_id,
                    reason = why.code(),
                    "delayed will dropped: the device may no longer publish"
                );
                return;
            }
        }
        drop(gauge);
        fire(&deps, &who, will, origin, &shutdown).await;
    });
}

/// Stores the will as an event, then it reaches subscribers like any
/// committed event (retained, if it asks and the tenant's bounds allow).
async fn fire(deps: &MqttDeps, who: &Identity, will: Will, origin: u64, shutdown: &CancellationToken) {
    let Will { message: will, props, .. } = will;
    let topic = String::from_utf8_lossy(&will.topic).into_owned();
    let Resolved::Event(event_type) = deps.topics.resolve(&topic, &who.tenant, &who.device_id) else {
        tracing::warn!(device_id = who.device_id, topic, "will is not an event of this device; not published");
        return;
    };
    let event_type: &str = &event_type;
    let stream = stream_topic(&who.tenant, &who.device_id, event_type);
    let retain = will.retain && deps.sessions.fanout().retain_fits(&who.tenant, &stream, will.message.len());
    let forwarded = PublishProperties {
        payload_format_indicator: props.as_ref().and_then(|p| p.payload_format_indicator),
        message_expiry_interval: props.as_ref().and_then(|p| p.message_expiry_interval),
        topic_alias: None,
        response_topic: props.as_ref().and_then(|p| p.response_topic.clone()),
        correlation_data: props.as_ref().and_then(|p| p.correlation_data.clone()),
        user_properties: props.as_ref().map(|p| p.user_properties.clone()).unwrap_or_default(),
        subscription_identifiers: vec![],
        content_type: props.as_ref().and_then(|p| p.content_type.clone()),
    };
    let (payload, properties, sent_bytes) = crate::payload::from_device(
        &will.message,
        crate::payload::event_properties(forwarded.content_type.as_deref(), &forwarded.user_properties, None),
    );
    let input = EventInput {
        device_id: who.device_id.clone(),
        event_type: event_type.to_string(),
        payload,
        id: None,
        timestamp: None,
        properties,
        sent_bytes,
    };
    let facts = Box::new(Facts {
        redelivery: None,
        qos2: None,
        // A retained will is kept in the site log like any retained
        // publish, so it survives a restart.
        retain_topic: retain.then_some(stream),
        via: None,
        published: Some(Published {
            qos: will.qos as u8,
            retain,
            origin,
            props: (forwarded != PublishProperties::default()).then_some(forwarded),
        }),
    });
    // Wills count against the device's rate limits like any publish: over
    // a limit the will waits (at most WILL_WAIT) for the window to allow it.
    let waited = Instant::now();
    while let Err(l) = deps.ingest.check_rate(&who.tenant, &who.device_id, 1) {
        if waited.elapsed() + l.retry_after > WILL_WAIT || shutdown.is_cancelled() {
            tracing::warn!(
                device_id = who.device_id,
                topic,
                window = l.window.as_str(),
                "will dropped: over the rate limit"
            );
            deps.ingest.count_rejected(super::PROTOCOL, "rate_limited");
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(l.retry_after) => {}
            () = shutdown.cancelled() => {}
        }
    }
    let answer = deps.ingest.submit_mqtt(&who.principal, &who.tenant, vec![(input, facts)]).await.pop();
    match answer.unwrap_or(Err(crate::ingest::Error::Unavailable(crate::log::Error::Closed))) {
        Ok(_) => tracing::info!(device_id = who.device_id, topic, retain, "will stored and published"),
        Err(e) => tracing::warn!(error = %e, device_id = who.device_id, "will refused"),
    }
}
