//! Which tenants someone at this site is subscribed to right now (WebSocket,
//! SSE, long-poll or MQTT). The central listener LISTENs to, and fetches
//! other sites' events of, only these tenants: a site nobody watches costs
//! the central database nothing but its own inserts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Subscribers per tenant; see the module docs.
#[derive(Default)]
pub struct Interest {
    tenants: Mutex<HashMap<String, Entry>>,
    changed: Notify,
}

struct Entry {
    holders: usize,
    /// When the last holder left (while `holders == 0`).
    left_at: Option<Instant>,
}

/// One subscriber's interest in a tenant, given up on drop.
pub struct Held {
    interest: Arc<Interest>,
    tenant: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.interest.leave(&self.tenant);
    }
}

impl Interest {
    /// A subscriber of `tenant` arrived.
    pub fn enter(&self, tenant: &str) {
        let mut m = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        let e = m.entry(tenant.to_string()).or_insert(Entry { holders: 0, left_at: None });
        e.holders += 1;
        e.left_at = None;
        if e.holders == 1 {
            // Stored as a permit when the listener is busy: never missed.
            self.changed.notify_one();
        }
    }

    /// A subscriber of `tenant` left.
    pub fn leave(&self, tenant: &str) {
        let mut m = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = m.get_mut(tenant) {
            e.holders = e.holders.saturating_sub(1);
            if e.holders == 0 {
                e.left_at = Some(Instant::now());
            }
        }
    }

    /// [`Interest::enter`] now, [`Interest::leave`] when the guard drops.
    pub fn hold(self: &Arc<Self>, tenant: &str) -> Held {
        self.enter(tenant);
        Held { interest: self.clone(), tenant: tenant.to_string() }
    }

    /// Tenants with a subscriber now, or whose last one left less than
    /// `linger` ago (so a long-poll client between two requests, or a
    /// reconnecting device, does not make the listener drop and re-read
    /// the tenant). Sorted.
    pub fn wanted(&self, linger: Duration) -> Vec<String> {
        let mut m = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        m.retain(|_, e| e.holders > 0 || e.left_at.is_some_and(|t| t.elapsed() < linger));
        let mut v: Vec<String> = m.keys().cloned().collect();
        v.sort();
        v
    }

    /// Resolves when a tenant gained its first subscriber (at once if one
    /// did since the last call).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_is_wanted_while_held_and_for_the_linger_after() {
        let i = Arc::new(Interest::default());
        assert!(i.wanted(Duration::from_secs(60)).is_empty());
        let a = i.hold("acme");
        let b = i.hold("acme");
        i.enter("globex");
        assert_eq!(i.wanted(Duration::ZERO), ["acme", "globex"]);
        drop(a);
        i.leave("globex");
        assert_eq!(i.wanted(Duration::ZERO), ["acme"], "one holder left, globex gone at once with no linger");
        drop(b);
        assert_eq!(i.wanted(Duration::from_secs(60)), ["acme"], "kept for the linger");
        assert!(i.wanted(Duration::ZERO).is_empty());
    }
}
