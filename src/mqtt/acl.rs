//! Who may publish and subscribe where. Devices publish only to their own
//! event topics, `<tenant>/devices/<device_id>/events/<event_type>`, and
//! subscribe only inside their tenant's stream (`<tenant>/events/…`) and
//! their own subtree (`<tenant>/devices/<device_id>/…`), or on the devices'
//! own layouts where `mqtt.topic_maps` can write them.

use super::topic_map::TopicMaps;
use crate::event::{validate_device_id, validate_event_type};

/// The event type of `<tenant>/devices/<device_id>/events/<event_type>`, if
/// `topic` is exactly that for this device.
pub(crate) fn event_topic<'t>(topic: &'t str, tenant: &str, device_id: &str) -> Option<&'t str> {
    let rest =
        topic.strip_prefix(tenant)?.strip_prefix("/devices/")?.strip_prefix(device_id)?.strip_prefix("/events/")?;
    validate_event_type(rest).ok().map(|()| rest)
}

/// A native event topic of the tenant that names another device than the
/// logged-in one (a gateway's child, or a refusal): `(device, event type)`.
pub(crate) fn other_event_topic<'t>(topic: &'t str, tenant: &str) -> Option<(&'t str, &'t str)> {
    let rest = topic.strip_prefix(tenant)?.strip_prefix("/devices/")?;
    let (device, event_type) = rest.split_once("/events/")?;
    validate_device_id(device).ok()?;
    validate_event_type(event_type).ok()?;
    Some((device, event_type))
}

/// The stream topic events of a device are delivered on:
/// `<tenant>/events/<device_id>/<event_type>`.
pub(crate) fn stream_topic(tenant: &str, device_id: &str, event_type: &str) -> String {
    format!("{tenant}/events/{device_id}/{event_type}")
}

/// Filters a device with `read_events` may subscribe to: the tenant's event
/// stream (`<tenant>/events/…`) and its own subtree (`<tenant>/devices/<id>/…`).
pub(crate) fn subscribe_allowed(filter: &str, tenant: &str, device_id: &str) -> bool {
    let under = |root: String| filter == format!("{root}/#") || filter.starts_with(&format!("{root}/"));
    (under(format!("{tenant}/events")) || under(format!("{tenant}/devices/{device_id}")))
        && !filter.contains("/#/")
        && filter.matches('#').count() <= 1
}

/// Where a subscription a device may make is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Matched {
    /// On the tenant's stream and the device's own subtree.
    Stream,
    /// On the devices' own layouts (`mqtt.topic_maps`), see
    /// [`TopicMaps::layouts`].
    Layout,
}

/// Whether a device with `read_events` may subscribe to `filter`, and where
/// it is matched; refusals say why (naming the rule for a layout).
pub(crate) fn subscription(filter: &str, tenant: &str, device_id: &str, topics: &TopicMaps) -> Result<Matched, String> {
    if subscribe_allowed(filter, tenant, device_id) {
        return Ok(Matched::Stream);
    }
    match topics.subscribable(filter) {
        Some(Ok(())) => Ok(Matched::Layout),
        Some(Err(why)) => Err(why),
        None => Err(format!(
            "devices subscribe inside {tenant}/events/#, {tenant}/devices/{device_id}/# or a topic of mqtt.topic_maps"
        )),
    }
}

/// The device and event type of a stream topic of `tenant`
/// (`<tenant>/events/<device_id>/<event_type>`).
pub(crate) fn stream_parts<'t>(topic: &'t str, tenant: &str) -> Option<(&'t str, &'t str)> {
    topic.strip_prefix(tenant)?.strip_prefix("/events/")?.split_once('/')
}

/// The client-id rule: the device id, or `<device id>-<suffix>`, at most
/// 128 bytes. (Router client ids are then namespaced by tenant.)
pub(crate) fn client_id_allowed(client_id: &str, device_id: &str) -> bool {
    client_id.len() <= MAX_CLIENT_ID
        && (client_id == device_id
            || client_id.strip_prefix(device_id).is_some_and(|rest| rest.len() > 1 && rest.starts_with('-')))
}

/// Longest client id accepted.
pub(crate) const MAX_CLIENT_ID: usize = 128;

/// Topics a connection may be sent: its tenant's stream and its own
/// subtree (what [`subscribe_allowed`] lets it subscribe to).
pub(crate) fn delivery_allowed(topic: &str, tenant: &str, device_id: &str) -> bool {
    let Some(rest) = topic.strip_prefix(tenant) else { return false };
    rest.starts_with("/events/")
        || rest.strip_prefix("/devices/").and_then(|r| r.strip_prefix(device_id)).is_some_and(|r| r.starts_with('/'))
}

/// MQTT topic-filter matching (`+` one level, `#` the rest, including the
/// parent level: `a/#` matches `a`).
pub(crate) fn topic_matches(topic: &str, filter: &str) -> bool {
    let mut t = topic.split('/');
    let mut f = filter.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_like_mqtt_says() {
        assert!(topic_matches("a/b/c", "a/#"));
        assert!(topic_matches("a", "a/#"), "# includes the parent level");
        assert!(topic_matches("a/b/c", "a/+/c"));
        assert!(!topic_matches("a/b/c", "a/+"));
        assert!(topic_matches("a/b", "a/b"));
        assert!(!topic_matches("a/b", "a/b/c"));
        assert!(topic_matches("a//c", "a/+/c"), "empty levels are levels");
    }

    #[test]
    fn client_ids_are_the_device_id_or_it_with_a_dash_suffix() {
        assert!(client_id_allowed("sensor-1", "sensor-1"));
        assert!(client_id_allowed("sensor-1-diag", "sensor-1"));
        assert!(!client_id_allowed("sensor-10", "sensor-1"), "a longer device id is another device");
        assert!(!client_id_allowed("sensor-1-", "sensor-1"));
        assert!(!client_id_allowed("sensor", "sensor-1"));
        assert!(!client_id_allowed("", "sensor-1"));
        assert!(!client_id_allowed(&format!("d-{}", "x".repeat(127)), "d"));
        assert!(client_id_allowed(&format!("d-{}", "x".repeat(126)), "d"));
    }

    #[test]
    fn deliveries_stay_inside_the_tenant_stream_and_own_subtree() {
        assert!(delivery_allowed("acme/events/d2/t", "acme", "d1"));
        assert!(delivery_allowed("acme/devices/d1/x", "acme", "d1"));
        assert!(!delivery_allowed("acme/devices/d10/x", "acme", "d1"));
        assert!(!delivery_allowed("globex/events/d1/t", "acme", "d1"));
        assert!(!delivery_allowed("acmex/events/d1/t", "acme", "d1"));
    }

    #[test]
    fn event_topics_are_the_devices_own_only() {
        assert_eq!(event_topic("acme/devices/d1/events/temp.read", "acme", "d1"), Some("temp.read"));
        assert_eq!(event_topic("acme/devices/d2/events/temp", "acme", "d1"), None);
        assert_eq!(event_topic("globex/devices/d1/events/temp", "acme", "d1"), None);
        assert_eq!(event_topic("acme/devices/d1/events/a/b", "acme", "d1"), None);
        assert_eq!(event_topic("acme/devices/d1/events/", "acme", "d1"), None);
        assert_eq!(event_topic("acme/devices/d1x/events/t", "acme", "d1"), None);
    }

    #[test]
    fn subscriptions_stay_inside_the_tenant_stream_and_own_subtree() {
        assert!(subscribe_allowed("acme/events/#", "acme", "d1"));
        assert!(subscribe_allowed("acme/events/d2/+", "acme", "d1"));
        assert!(subscribe_allowed("acme/devices/d1/#", "acme", "d1"));
        assert!(!subscribe_allowed("acme/devices/d2/#", "acme", "d1"));
        assert!(!subscribe_allowed("#", "acme", "d1"));
        assert!(!subscribe_allowed("globex/events/#", "acme", "d1"));
        assert!(!subscribe_allowed("acme/eventsx/#", "acme", "d1"));
        assert!(!subscribe_allowed("+/events/#", "acme", "d1"));
    }
}
