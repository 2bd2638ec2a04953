//! Topic maps (issue #31): devices that publish to their own topic layout
//! (`shellies/<id>/relay/0`, `tele/<id>/SENSOR`) without being reflashed.
//! Each `[[mqtt.topic_maps]]` rule is a pattern of `/`-separated segments:
//!
//! - a literal segment matches itself;
//! - `+` matches any one segment;
//! - `{device}` (required, once) matches one segment, which must be the
//!   logged-in device's id: a device still publishes only as itself;
//! - `{type}` matches one segment, `{type..}` (last) one or more, joined
//!   with `.` into the event type (`relay/0` → `relay.0`);
//!
//! and a rule without `{type}` names its `event_type`. The first rule whose
//! shape matches decides; a topic that matches a rule for another device, or
//! whose event type is not valid, is refused naming the rule. The event is
//! then the device's like any other: same ack, DUP and QoS 2 rules, tenant,
//! retained message and fan-out on `<tenant>/events/<device>/<type>`.
//!
//! The map also runs backwards, for subscribers on a device's own layout (a
//! relay listening on `shellies/<id>/relay/0/command`): an event of
//! `(device, type)` is on a rule's topic when the rule can write it (no
//! `+`; a fixed `event_type` only for that type) and that topic maps back
//! to the same event (no earlier rule of the same shape decides otherwise),
//! so what a device receives on a layout topic is what a publish there
//! would have stored. A subscription filter may use a rule's layout when it
//! keeps the rule's literal segments and can match its topics.

use std::borrow::Cow;

use crate::config::TopicMapRule;
use crate::event::{validate_device_id, validate_event_type};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Any,
    Device,
    Type,
    TypeRest,
}

/// A rule, parsed.
#[derive(Debug, Clone)]
struct Rule {
    index: usize,
    pattern: String,
    segments: Vec<Segment>,
    event_type: Option<String>,
}

/// The configured rules, parsed once.
#[derive(Debug, Clone, Default)]
pub(crate) struct TopicMaps {
    rules: Vec<Rule>,
}

/// What a publish topic is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Resolved<'t> {
    /// An event of the logged-in device, of this type.
    Event(Cow<'t, str>),
    /// An event topic (native, or a rule's) that names another device: a
    /// gateway's publish for a child, refused (`why`) for any other login.
    Other { device: &'t str, event_type: Cow<'t, str>, why: String },
    /// No rule (and not the device's native event topic).
    NoMatch,
    /// A rule matched its shape but refuses it: the reason names the rule.
    Refused(String),
}

impl Resolved<'_> {
    /// Why the device may not publish (or leave a will) on this topic, or
    /// `None` when it may.
    pub(crate) fn refusal(self, may_write: bool, tenant: &str, device_id: &str) -> Option<String> {
        match self {
            Resolved::Event(_) if may_write => None,
            Resolved::Event(_) => Some("the login lacks write_events".into()),
            Resolved::Other { why, .. } => Some(why),
            Resolved::NoMatch => Some(format!(
                "devices publish to {tenant}/devices/{device_id}/events/<event_type> (or a topic of mqtt.topic_maps)"
            )),
            Resolved::Refused(why) => Some(why),
        }
    }
}

fn parse(index: usize, rule: &TopicMapRule) -> Result<Rule, String> {
    let name = format!("mqtt.topic_maps[{index}] (match = {:?})", rule.pattern);
    let mut segments = Vec::new();
    let parts: Vec<&str> = rule.pattern.split('/').collect();
    for (i, p) in parts.iter().enumerate() {
        segments.push(match *p {
            "{device}" => Segment::Device,
            "{type}" => Segment::Type,
            "{type..}" if i + 1 == parts.len() => Segment::TypeRest,
            "{type..}" => return Err(format!("{name}: {{type..}} must be the last segment")),
            "+" => Segment::Any,
            "" => return Err(format!("{name}: empty segment")),
            p if p.contains(['{', '}', '#', '+']) || p.starts_with('$') => {
                return Err(format!("{name}: segment {p:?} is not a literal, +, {{device}}, {{type}} or {{type..}}"));
            }
            p => Segment::Literal(p.to_string()),
        });
    }
    let count = |s: &Segment| segments.iter().filter(|x| *x == s).count();
    if count(&Segment::Device) != 1 {
        return Err(format!("{name}: needs {{device}} exactly once (a device publishes only as itself)"));
    }
    let typed = count(&Segment::Type) + count(&Segment::TypeRest);
    match (typed, &rule.event_type) {
        (0, None) => return Err(format!("{name}: needs {{type}}, {{type..}} or an event_type")),
        (0, Some(t)) => validate_event_type(t).map_err(|e| format!("{name}: event_type {t:?} {}", e.message))?,
        (1, None) => {}
        (1, Some(_)) => return Err(format!("{name}: has {{type}} and an event_type; keep one")),
        _ => return Err(format!("{name}: {{type}} at most once")),
    }
    Ok(Rule { index, pattern: rule.pattern.clone(), segments, event_type: rule.event_type.clone() })
}

impl TopicMaps {
    /// Parses the rules; errors name the rule (config validation shows them).
    pub(crate) fn new(rules: &[TopicMapRule]) -> Result<Self, Vec<String>> {
        let (ok, errs): (Vec<_>, Vec<_>) = rules.iter().enumerate().map(|(i, r)| parse(i, r)).partition(Result::is_ok);
        if !errs.is_empty() {
            return Err(errs.into_iter().filter_map(Result::err).collect());
        }
        Ok(Self { rules: ok.into_iter().filter_map(Result::ok).collect() })
    }

    /// The event a publish to `topic` by `device_id` of `tenant` is: the
    /// native `<tenant>/devices/<id>/events/<type>`, else the first rule
    /// whose shape matches.
    pub(crate) fn resolve<'t>(&self, topic: &'t str, tenant: &str, device_id: &str) -> Resolved<'t> {
        if let Some(t) = super::acl::event_topic(topic, tenant, device_id) {
            return Resolved::Event(Cow::Borrowed(t));
        }
        if let Some((device, t)) = super::acl::other_event_topic(topic, tenant) {
            let why = format!(
                "devices publish to {tenant}/devices/{device_id}/events/<event_type> (or a topic of mqtt.topic_maps); {device:?} is another device"
            );
            return Resolved::Other { device, event_type: Cow::Borrowed(t), why };
        }
        let parts: Vec<&str> = topic.split('/').collect();
        for rule in &self.rules {
            if let Some(r) = rule.apply(&parts, device_id) {
                return r;
            }
        }
        Resolved::NoMatch
    }

    /// The topics an event of `device` of type `event_type` of `tenant` is
    /// on in the devices' own layouts: one per rule that can write it and
    /// whose topic maps back to this event (not the native topic of the
    /// tenant, the first rule of its shape this rule, with the same device
    /// and type).
    pub(crate) fn layouts(&self, tenant: &str, device: &str, event_type: &str) -> Vec<String> {
        self.rules
            .iter()
            .filter_map(|rule| {
                let topic = rule.render(device, event_type)?;
                if super::acl::other_event_topic(&topic, tenant).is_some() {
                    return None;
                }
                let parts: Vec<&str> = topic.split('/').collect();
                let (first, (d, t)) = self.rules.iter().find_map(|r| Some((r.index, r.locate(&parts)?)))?;
                (first == rule.index && d == device && t == event_type).then_some(topic)
            })
            .collect()
    }

    /// Whether a subscription `filter` is on the devices' own layouts:
    /// `None` when it fits no rule; `Some(Err)` naming the rule when the
    /// rules it fits cannot write events (a `+` segment); `Some(Ok)` when
    /// a rule's topics can match it. A filter fits a rule when it has the
    /// rule's literal segments where the rule has them (`+` and `#`
    /// elsewhere, `#` not first).
    pub(crate) fn subscribable(&self, filter: &str) -> Option<Result<(), String>> {
        let levels: Vec<&str> = filter.split('/').collect();
        let wild = |l: &&str| l.contains(['+', '#']) && *l != "+" && *l != "#";
        let hash = levels.iter().position(|l| *l == "#");
        if levels.iter().any(wild) || hash.is_some_and(|at| at == 0 || at + 1 != levels.len()) {
            return None;
        }
        let mut fitting = self.rules.iter().filter(|r| r.fits(&levels)).peekable();
        let first = fitting.peek().map(|r| r.name())?;
        if fitting.any(Rule::writes) {
            return Some(Ok(()));
        }
        Some(Err(format!(
            "{first} has a + segment, so events cannot be delivered on its topics; subscribe to a rule without one"
        )))
    }
}

impl Rule {
    fn name(&self) -> String {
        format!("mqtt.topic_maps[{}] ({:?})", self.index, self.pattern)
    }

    /// The device and event type a topic (split at `/`) of this rule's
    /// shape names, unchecked; `None` when it does not have the shape.
    fn locate<'t>(&self, parts: &[&'t str]) -> Option<(&'t str, Cow<'t, str>)> {
        let rest = self.segments.last() == Some(&Segment::TypeRest);
        let fixed = self.segments.len() - usize::from(rest);
        if parts.len() < self.segments.len() || (!rest && parts.len() != self.segments.len()) {
            return None;
        }
        let (mut device, mut kind): (Option<&str>, Option<Cow<'t, str>>) = (None, None);
        for (seg, part) in self.segments[..fixed].iter().zip(parts) {
            match seg {
                Segment::Literal(l) if l != part => return None,
                Segment::Device => device = Some(part),
                Segment::Type => kind = Some(Cow::Borrowed(part)),
                _ => {}
            }
        }
        if rest {
            kind = Some(Cow::Owned(parts[fixed..].join(".")));
        }
        let kind = kind.unwrap_or_else(|| Cow::Owned(self.event_type.clone().unwrap_or_default()));
        Some((device.unwrap_or_default(), kind))
    }

    /// Whether it can write an event's topic (it has no `+`).
    fn writes(&self) -> bool {
        !self.segments.contains(&Segment::Any)
    }

    /// The topic of an event of `device` and `event_type` in this layout,
    /// when the rule can write it.
    fn render(&self, device: &str, event_type: &str) -> Option<String> {
        if self.event_type.as_deref().is_some_and(|t| t != event_type) {
            return None;
        }
        let mut topic = String::with_capacity(self.pattern.len() + device.len() + event_type.len());
        for (i, seg) in self.segments.iter().enumerate() {
            if i > 0 {
                topic.push('/');
            }
            match seg {
                Segment::Literal(l) => topic.push_str(l),
                Segment::Device => topic.push_str(device),
                Segment::Type => topic.push_str(event_type),
                Segment::TypeRest => topic.push_str(&event_type.replace('.', "/")),
                Segment::Any => return None,
            }
        }
        Some(topic)
    }

    /// Whether a subscription filter (split at `/`, wildcards checked) can
    /// match topics of this shape and keeps its literal segments.
    fn fits(&self, levels: &[&str]) -> bool {
        for (i, level) in levels.iter().enumerate() {
            match (self.segments.get(i), *level) {
                (_, "#") => return i <= self.segments.len(),
                (Some(Segment::Literal(l)), level) if l != level => return false,
                (Some(Segment::TypeRest), _) => return true,
                (None, _) => return false,
                _ => {}
            }
        }
        levels.len() == self.segments.len()
    }

    /// `None` when the topic does not have this rule's shape.
    fn apply<'t>(&self, parts: &[&'t str], device_id: &str) -> Option<Resolved<'t>> {
        let (device, kind) = self.locate(parts)?;
        if let Err(e) = validate_event_type(&kind) {
            return Some(Resolved::Refused(format!("{} gives event type {kind:?}, which {}", self.name(), e.message)));
        }
        if device != device_id {
            if validate_device_id(device).is_err() {
                return Some(Resolved::Refused(format!("{} names {device:?}, which is not a device id", self.name())));
            }
            let why = format!("{} names device {device:?}, not the logged-in {device_id:?}", self.name());
            return Some(Resolved::Other { device, event_type: kind, why });
        }
        Some(Resolved::Event(kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, event_type: Option<&str>) -> TopicMapRule {
        TopicMapRule { pattern: pattern.into(), event_type: event_type.map(str::to_string) }
    }

    fn maps() -> TopicMaps {
        TopicMaps::new(&[
            rule("shellies/{device}/{type..}", None),
            rule("tele/{device}/{type}", None),
            rule("stat/{device}/+", Some("status")),
        ])
        .unwrap()
    }

    #[test]
    fn shelly_and_tasmota_layouts_become_events_of_the_device() {
        let m = maps();
        let ev = |t: &str| Resolved::Event(Cow::Owned(t.to_string()));
        assert_eq!(m.resolve("shellies/relay-1/relay/0", "acme", "relay-1"), ev("relay.0"));
        assert_eq!(m.resolve("shellies/relay-1/temperature", "acme", "relay-1"), ev("temperature"));
        assert_eq!(m.resolve("tele/sensor-1/SENSOR", "acme", "sensor-1"), ev("SENSOR"));
        assert_eq!(m.resolve("stat/sensor-1/POWER", "acme", "sensor-1"), ev("status"));
        // The native topic still works, and comes first.
        assert_eq!(m.resolve("acme/devices/relay-1/events/x", "acme", "relay-1"), ev("x"));
    }

    #[test]
    fn another_devices_topic_or_a_bad_type_is_refused_naming_the_rule_and_the_rest_does_not_match() {
        let m = maps();
        let refused = |r: Resolved<'_>| match r {
            Resolved::Refused(why) => why,
            other => panic!("not refused: {other:?}"),
        };
        // Another device's topic: its device and type (a gateway's child),
        // refused naming the rule for any other login.
        let other = m.resolve("shellies/relay-2/relay/0", "acme", "relay-1");
        let Resolved::Other { device, event_type, why } = &other else { panic!("{other:?}") };
        assert_eq!((*device, event_type.as_ref()), ("relay-2", "relay.0"));
        assert!(
            why.starts_with("mqtt.topic_maps[0] (\"shellies/{device}/{type..}\") names device \"relay-2\""),
            "{why}"
        );
        let native = m.resolve("acme/devices/relay-2/events/x", "acme", "relay-1");
        assert!(matches!(native, Resolved::Other { device: "relay-2", .. }), "{native:?}");
        let why = native.refusal(true, "acme", "relay-1").unwrap();
        assert!(why.contains("acme/devices/relay-1/events/<event_type>"), "{why}");
        let why = refused(m.resolve("shellies/a b/relay/0", "acme", "relay-1"));
        assert!(why.contains("not a device id"), "{why}");
        let why = refused(m.resolve("tele/sensor-1/bad type", "acme", "sensor-1"));
        assert!(why.contains("topic_maps[1]") && why.contains("[A-Za-z0-9_.-]"), "{why}");
        assert_eq!(m.resolve("tele/sensor-1/SENSOR/extra", "acme", "sensor-1"), Resolved::NoMatch);
        assert_eq!(m.resolve("shellies/relay-1", "acme", "relay-1"), Resolved::NoMatch);
        assert_eq!(m.resolve("zigbee2mqtt/lamp", "acme", "relay-1"), Resolved::NoMatch);
        assert_eq!(m.resolve("globex/devices/relay-1/events/x", "acme", "relay-1"), Resolved::NoMatch);
    }

    #[test]
    fn rules_that_could_let_a_device_publish_as_another_are_refused_at_start() {
        let errors = |r: TopicMapRule| TopicMaps::new(&[r]).unwrap_err().join("; ");
        assert!(errors(rule("shellies/{type..}", None)).contains("needs {device} exactly once"));
        assert!(errors(rule("a/{device}/{device}/{type}", None)).contains("exactly once"));
        assert!(errors(rule("a/{device}", None)).contains("needs {type}, {type..} or an event_type"));
        assert!(errors(rule("a/{device}/{type}", Some("x"))).contains("keep one"));
        assert!(errors(rule("a/{type..}/{device}", None)).contains("last segment"));
        assert!(errors(rule("a/#/{device}/{type}", None)).contains("is not a literal"));
        assert!(errors(rule("a/{device}", Some("bad type"))).contains("event_type"));
        assert!(errors(rule("a//{device}/{type}", None)).contains("empty segment"));
    }

    #[test]
    fn an_event_is_on_the_layout_topics_that_map_back_to_it() {
        let m = maps();
        assert_eq!(
            m.layouts("acme", "relay-1", "relay.0.command"),
            ["shellies/relay-1/relay/0/command", "tele/relay-1/relay.0.command"]
        );
        assert_eq!(m.layouts("acme", "sensor-1", "SENSOR"), ["shellies/sensor-1/SENSOR", "tele/sensor-1/SENSOR"]);
        // stat/{device}/+ cannot write a topic; a fixed type only its own.
        assert!(m.layouts("acme", "sensor-1", "status").iter().all(|t| !t.starts_with("stat/")));
        let fixed = TopicMaps::new(&[rule("zigbee2mqtt/{device}", Some("state"))]).unwrap();
        assert_eq!(fixed.layouts("acme", "lamp", "state"), ["zigbee2mqtt/lamp"]);
        assert!(fixed.layouts("acme", "lamp", "set").is_empty());
        // An earlier rule of the same shape would read the topic as another
        // event: not on it.
        let shadowed =
            TopicMaps::new(&[rule("s/{device}/relay/{type}", None), rule("s/{device}/{type..}", None)]).unwrap();
        assert_eq!(shadowed.layouts("acme", "r", "relay.0"), ["s/r/relay/relay.0"], "not s/r/relay/0: that is type 0");
        assert_eq!(shadowed.layouts("acme", "r", "0"), ["s/r/relay/0", "s/r/0"]);
        // Each layout topic a publish there would store as the same event.
        for t in m.layouts("acme", "relay-1", "relay.0.command") {
            assert_eq!(m.resolve(&t, "acme", "relay-1"), Resolved::Event(Cow::Borrowed("relay.0.command")));
        }
        // A rule whose topic is a native event topic of the tenant is not a layout.
        let native = TopicMaps::new(&[rule("acme/devices/{device}/events/{type}", None)]).unwrap();
        assert!(native.layouts("acme", "d", "t").is_empty());
    }

    #[test]
    fn subscriptions_fit_a_rule_that_can_write_its_topics_or_are_refused_naming_it() {
        let m = maps();
        for ok in
            ["shellies/relay-1/relay/0/command", "shellies/+/relay/0", "shellies/#", "tele/+/+", "tele/s/SENSOR/#"]
        {
            assert_eq!(m.subscribable(ok), Some(Ok(())), "{ok}");
        }
        for none in
            ["#", "+/relay-1/x", "tele/a", "tele/a/b/c", "other/a/b", "shellies/a#", "shellies/#/x", "acme/events/#"]
        {
            assert_eq!(m.subscribable(none), None, "{none}");
        }
        let why = m.subscribable("stat/sensor-1/POWER").unwrap().unwrap_err();
        assert!(why.starts_with("mqtt.topic_maps[2] (\"stat/{device}/+\") has a + segment"), "{why}");
    }
}
