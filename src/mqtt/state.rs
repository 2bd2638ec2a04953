//! What the front-end keeps across connections, so rumqttd's own state
//! (which only grows) stays bounded and presence stays right:
//! live sessions per device, persistent sessions per device, and retained
//! messages per tenant.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::config::MqttConfig;

/// Shared by every connection of the listener.
pub struct Sessions {
    inner: Mutex<Inner>,
    max_persistent: usize,
    max_retained: usize,
    max_retained_bytes: usize,
}

#[derive(Default)]
struct Inner {
    /// Live connections per (tenant, device): presence is online while > 0.
    live: HashMap<(String, String), usize>,
    /// Router client ids of persistent sessions per device, oldest first.
    persistent: HashMap<(String, String), VecDeque<String>>,
    /// Retained stream topics per tenant with their payload sizes, and the total.
    retained: HashMap<String, (HashMap<String, usize>, usize)>,
}

impl Sessions {
    /// Bounds from the `[mqtt]` config.
    pub fn new(config: &MqttConfig) -> Self {
        Self {
            inner: Mutex::default(),
            max_persistent: config.max_sessions_per_device,
            max_retained: config.max_retained_per_tenant,
            max_retained_bytes: config.max_retained_bytes_per_tenant,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a live connection; true when it is the device's first.
    pub fn connected(&self, tenant: &str, device_id: &str) -> bool {
        let mut g = self.lock();
        let n = g.live.entry((tenant.to_string(), device_id.to_string())).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// Uncounts a live connection; true when it was the device's last.
    pub fn disconnected(&self, tenant: &str, device_id: &str) -> bool {
        let mut g = self.lock();
        let key = (tenant.to_string(), device_id.to_string());
        let Some(n) = g.live.get_mut(&key) else { return true };
        *n = n.saturating_sub(1);
        if *n == 0 {
            g.live.remove(&key);
            return true;
        }
        false
    }

    /// Records the session `router_id` of a device: persistent or not. Returns
    /// the persistent sessions to drop from the router (oldest beyond the bound).
    pub fn session(&self, tenant: &str, device_id: &str, router_id: &str, persistent: bool) -> Vec<String> {
        let mut g = self.lock();
        let key = (tenant.to_string(), device_id.to_string());
        let list = g.persistent.entry(key.clone()).or_default();
        // A clean session replaces whatever the router kept under that id.
        list.retain(|id| id != router_id);
        if persistent {
            list.push_back(router_id.to_string());
        }
        let mut evict = Vec::new();
        while list.len() > self.max_persistent {
            evict.extend(list.pop_front());
        }
        if list.is_empty() {
            g.persistent.remove(&key);
        }
        evict
    }

    /// A retained publish of `bytes` on `topic` (0 clears it). False when the
    /// tenant's bounds leave no room: then it is delivered but not retained.
    pub fn retain(&self, tenant: &str, topic: &str, bytes: usize) -> bool {
        let mut g = self.lock();
        let (topics, total) = g.retained.entry(tenant.to_string()).or_default();
        let old = topics.get(topic).copied();
        if bytes == 0 {
            if let Some(old) = topics.remove(topic) {
                *total -= old;
            }
            return true;
        }
        let count = topics.len() + usize::from(old.is_none());
        let new_total = *total - old.unwrap_or(0) + bytes;
        if count > self.max_retained || new_total > self.max_retained_bytes {
            return false;
        }
        topics.insert(topic.to_string(), bytes);
        *total = new_total;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> Sessions {
        Sessions::new(&MqttConfig {
            max_sessions_per_device: 2,
            max_retained_per_tenant: 2,
            max_retained_bytes_per_tenant: 10,
            ..MqttConfig::default()
        })
    }

    #[test]
    fn presence_stays_online_until_the_last_session_ends() {
        let s = sessions();
        assert!(s.connected("acme", "d1"));
        assert!(!s.connected("acme", "d1"));
        assert!(s.connected("globex", "d1"), "tenants are counted apart");
        assert!(!s.disconnected("acme", "d1"));
        assert!(s.disconnected("acme", "d1"));
    }

    #[test]
    fn persistent_sessions_per_device_are_bounded_oldest_first() {
        let s = sessions();
        assert!(s.session("acme", "d1", "acme|d1|d1-a", true).is_empty());
        assert!(s.session("acme", "d1", "acme|d1|d1-b", true).is_empty());
        assert!(s.session("acme", "d1", "acme|d1|d1-a", true).is_empty(), "a resumed session is not a new one");
        assert_eq!(s.session("acme", "d1", "acme|d1|d1-c", true), vec!["acme|d1|d1-b".to_string()]);
        assert!(s.session("acme", "d1", "acme|d1|d1-a", false).is_empty(), "clean replaces persistent");
        assert!(s.session("acme", "d1", "acme|d1|d1-d", true).is_empty());
    }

    #[test]
    fn retained_messages_are_bounded_by_count_and_bytes() {
        let s = sessions();
        assert!(s.retain("acme", "a", 4));
        assert!(s.retain("acme", "b", 4));
        assert!(!s.retain("acme", "c", 1), "count");
        assert!(!s.retain("acme", "a", 7), "bytes");
        assert!(s.retain("acme", "a", 6), "replacing counts the difference");
        assert!(s.retain("acme", "b", 0), "an empty retained publish clears");
        assert!(s.retain("acme", "c", 1));
        assert!(s.retain("globex", "a", 10), "tenants are bounded apart");
    }
}
