//! `Config::validate`: every problem at once, each naming its key and the
//! allowed range.

use std::time::Duration;

use super::{Algorithm, Config, HttpConfig, RateOverride, url_has_password, valid_site_id};
use crate::event::Tenant;

/// `log.commit_delay` at most: a second of added ack latency is already far
/// past what a device's publish timeout tolerates.
const MAX_COMMIT_DELAY: Duration = Duration::from_secs(1);

impl Config {
    /// Lists every problem, not just the first.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        self.check_site_and_listeners(&mut problems);
        self.check_log(&mut problems);
        self.check_limits(&mut problems);
        self.check_auth(&mut problems);
        self.check_central(&mut problems);
        if self.shutdown_grace.is_zero() {
            problems.push("shutdown_grace: must be greater than 0".into());
        }
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    /// `site`, `http`, `mqtt`, `stream` and `tls`.
    fn check_site_and_listeners(&self, problems: &mut Vec<String>) {
        let tls_listeners = self.tls_listeners();
        let files = (self.tls.cert_file.is_some(), self.tls.key_file.is_some());
        if tls_listeners && files != (true, true) {
            problems.push(
                "tls.cert_file and tls.key_file: both must be set when http.tls_listen or mqtt.tls_listen is".into(),
            );
        }
        if !tls_listeners && files != (false, false) {
            problems.push(
                "tls.cert_file / tls.key_file are set but no TLS listener is (http.tls_listen, mqtt.tls_listen)".into(),
            );
        }
        if !tls_listeners && self.tls.client_ca_file.is_some() {
            problems.push(
                "tls.client_ca_file is set but no TLS listener is (http.tls_listen, mqtt.tls_listen): client certificates come with TLS".into(),
            );
        }
        if let Some(id) = &self.site.id
            && !valid_site_id(id)
        {
            problems.push(format!("site.id {id:?}: must be 1-64 characters of [A-Za-z0-9_.-]"));
        }
        if self.site.data_dir.as_os_str().is_empty() {
            problems.push("site.data_dir: must not be empty".into());
        }
        if self.http.max_body_bytes < 1024 {
            problems.push(format!("http.max_body_bytes = {}: must be at least 1024", self.http.max_body_bytes));
        }
        if let Err(e) = self.http.status_token() {
            problems.push(e);
        }
        let h = &self.http;
        if h.max_connections == 0 {
            problems.push("http.max_connections: must be at least 1".into());
        }
        if h.header_timeout < Duration::from_millis(100) || h.body_timeout < Duration::from_millis(100) {
            problems.push("http.header_timeout and http.body_timeout: must be at least 100ms".into());
        }
        if h.tls_handshake_timeout < Duration::from_millis(100) {
            problems.push("http.tls_handshake_timeout: must be at least 100ms".into());
        }
        let m = &self.mqtt;
        if m.max_connections == 0 {
            problems.push("mqtt.max_connections: must be at least 1".into());
        }
        if m.max_packet_size < 1024 || m.max_packet_size > 256 * 1024 * 1024 {
            problems.push(format!("mqtt.max_packet_size = {}: must be 1024..=268435456", m.max_packet_size));
        }
        if m.max_inflight == 0 || m.max_inflight > 65_535 {
            problems.push(format!("mqtt.max_inflight = {}: must be 1..=65535", m.max_inflight));
        }
        for (k, v) in [
            ("max_sessions_per_device", m.max_sessions_per_device),
            ("max_filters", m.max_filters),
            ("max_retained_per_tenant", m.max_retained_per_tenant),
            ("max_retained_bytes_per_tenant", m.max_retained_bytes_per_tenant),
            ("max_queued_messages", m.max_queued_messages),
            ("max_queued_bytes", m.max_queued_bytes),
        ] {
            if v == 0 {
                problems.push(format!("mqtt.{k}: must be at least 1"));
            }
        }
        if m.max_session_expiry > Duration::from_secs(u64::from(u32::MAX - 1)) {
            problems.push("mqtt.max_session_expiry: must be below 136 years (MQTT's u32 seconds)".into());
        }
        if m.max_keep_alive > Duration::from_secs(65_535) {
            problems.push("mqtt.max_keep_alive: must be at most 65535s (MQTT's u16 seconds)".into());
        }
        if m.connect_timeout < Duration::from_millis(100) {
            problems.push("mqtt.connect_timeout: must be at least 100ms".into());
        }
        if m.write_timeout < Duration::from_millis(100) {
            problems.push("mqtt.write_timeout: must be at least 100ms".into());
        }
        if !(16..=65_535).contains(&m.max_topic_length) {
            problems.push(format!("mqtt.max_topic_length = {}: must be 16..=65535", m.max_topic_length));
        }
        if let Err(errors) = crate::mqtt::topic_map::TopicMaps::new(&m.topic_maps) {
            problems.extend(errors);
        }
        let st = &self.stream;
        if st.queue < 16 || st.queue > 1 << 20 {
            problems.push(format!("stream.queue = {}: must be 16..=1048576", st.queue));
        }
        if st.max_subscribers == 0 {
            problems.push("stream.max_subscribers: must be at least 1".into());
        }
        if st.ping_interval < Duration::from_secs(1) || st.sse_heartbeat < Duration::from_secs(1) {
            problems.push("stream.ping_interval and stream.sse_heartbeat: must be at least 1s".into());
        }
    }

    /// `log`.
    fn check_log(&self, problems: &mut Vec<String>) {
        if self.log.max_bytes < 1024 * 1024 {
            problems.push(format!("log.max_bytes = {}: must be at least 1048576 (1 MiB)", self.log.max_bytes));
        }
        if self.log.commit_delay > MAX_COMMIT_DELAY {
            problems.push(format!(
                "log.commit_delay = {}: at most {} (every ack waits up to this long)",
                humantime::format_duration(self.log.commit_delay),
                humantime::format_duration(MAX_COMMIT_DELAY)
            ));
        }
        if self.log.max_commit_delay > MAX_COMMIT_DELAY {
            problems.push(format!(
                "log.max_commit_delay = {}: at most {} (every ack may wait up to this long)",
                humantime::format_duration(self.log.max_commit_delay),
                humantime::format_duration(MAX_COMMIT_DELAY)
            ));
        }
        if self.log.write_budget > 0 && self.log.max_commit_delay < self.log.commit_delay {
            problems.push(format!(
                "log.max_commit_delay = {}: below log.commit_delay = {} (the budget holds groups between the two)",
                humantime::format_duration(self.log.max_commit_delay),
                humantime::format_duration(self.log.commit_delay)
            ));
        }
        if self.disk.endurance_tbw < 0.0 || !self.disk.endurance_tbw.is_finite() {
            problems.push(format!(
                "disk.endurance_tbw = {}: the storage's rated endurance in terabytes written (e.g. 30), or 0 if unknown",
                self.disk.endurance_tbw
            ));
        }
        if self.log.commit_max_rows == 0 {
            problems.push("log.commit_max_rows: must be at least 1".into());
        }
        if self.log.remote_max_bytes.is_some_and(|r| r > self.log.max_bytes) {
            problems.push("log.remote_max_bytes: must not exceed log.max_bytes".into());
        }
        if self.log.commit_max_bytes < 64 * 1024 {
            problems.push("log.commit_max_bytes: must be at least 65536".into());
        }
        if self.log.queue_capacity == 0 {
            problems.push("log.queue_capacity: must be at least 1".into());
        }
    }

    /// `limits`, with its per-tenant and per-device overrides.
    fn check_limits(&self, problems: &mut Vec<String>) {
        let check_rates = |problems: &mut Vec<String>, at: &str, s: u32, m: u32, h: u32| {
            for (k, v) in [("per_second", s), ("per_minute", m), ("per_hour", h)] {
                if v == 0 {
                    problems.push(format!("{at}.{k}: must be at least 1"));
                }
            }
        };
        let l = &self.limits;
        check_rates(problems, "limits", l.per_second, l.per_minute, l.per_hour);
        // An override names only the windows it changes; each must be ≥ 1.
        let check_override = |problems: &mut Vec<String>, at: &str, o: &RateOverride| {
            check_rates(problems, at, o.per_second.unwrap_or(1), o.per_minute.unwrap_or(1), o.per_hour.unwrap_or(1));
        };
        for (tenant, o) in &l.tenants {
            if Tenant::parse(tenant).is_err() {
                problems.push(format!("limits.tenants.{tenant}: not a valid tenant name (^[a-z][a-z0-9_]{{0,40}}$)"));
            }
            check_override(problems, &format!("limits.tenants.{tenant}"), o);
        }
        for (key, o) in &l.devices {
            if !key.split_once('/').is_some_and(|(t, d)| Tenant::parse(t).is_ok() && !d.is_empty()) {
                problems.push(format!("limits.devices.\"{key}\": key must be \"<tenant>/<device_id>\""));
            }
            check_override(problems, &format!("limits.devices.\"{key}\""), o);
        }
        if l.max_batch == 0 || l.max_batch > 100_000 {
            problems.push(format!("limits.max_batch = {}: must be 1..=100000", l.max_batch));
        }
        if l.max_payload_bytes < 2 || l.max_payload_bytes > 16 * 1024 * 1024 {
            problems.push(format!("limits.max_payload_bytes = {}: must be 2..=16777216", l.max_payload_bytes));
        }
        if l.max_payload_bytes > self.http.max_body_bytes {
            problems.push(format!(
                "limits.max_payload_bytes = {} exceeds http.max_body_bytes = {}",
                l.max_payload_bytes, self.http.max_body_bytes
            ));
        }
        if l.max_payload_depth == 0 || l.max_payload_depth > 128 {
            problems.push(format!("limits.max_payload_depth = {}: must be 1..=128", l.max_payload_depth));
        }
    }

    /// `auth`.
    fn check_auth(&self, problems: &mut Vec<String>) {
        match self.auth.algorithm {
            Algorithm::HS256 => {}
            Algorithm::EdDSA | Algorithm::ES256 => {
                if self.auth.public_key_file.is_none() {
                    problems.push(format!(
                        "auth.public_key_file: required when auth.algorithm = \"{:?}\"",
                        self.auth.algorithm
                    ));
                }
            }
        }
        if self.auth.token_ttl < Duration::from_secs(60) {
            problems.push("auth.token_ttl: must be at least 1m".into());
        }
    }

    /// `central`.
    fn check_central(&self, problems: &mut Vec<String>) {
        let c = &self.central;
        for (key, url) in [("central.url", &c.url), ("central.listen_url", &c.listen_url)] {
            let Some(url) = url else { continue };
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                problems.push(format!("{key}: must start with postgres:// or postgresql://"));
            } else if url_has_password(url) {
                problems.push(format!(
                    "{key}: must not contain a password; use central.password_file or OUTPOST_CENTRAL_PASSWORD"
                ));
            }
        }
        if c.max_batch_wait < c.batch_wait {
            problems.push(format!(
                "central.max_batch_wait = {}: below central.batch_wait = {} (a busy central stretches the wait between the two)",
                humantime::format_duration(c.max_batch_wait),
                humantime::format_duration(c.batch_wait)
            ));
        }
        if c.listen_url.is_some() && c.url.is_none() {
            problems.push("central.listen_url: set without central.url (it is only where LISTEN connects)".into());
        }
        for t in &c.tenants {
            if Tenant::parse(t).is_err() {
                problems.push(format!("central.tenants: {t:?} is not a valid tenant name (^[a-z][a-z0-9_]{{0,40}}$)"));
            }
        }
        if c.batch_rows == 0 || c.batch_rows > 100_000 {
            problems.push(format!("central.batch_rows = {}: must be 1..=100000", c.batch_rows));
        }
        if c.batch_bytes < 64 * 1024 {
            problems.push(format!("central.batch_bytes = {}: must be at least 65536", c.batch_bytes));
        }
        if c.max_backoff < Duration::from_millis(100) {
            problems.push("central.max_backoff: must be at least 100ms".into());
        }
        if c.statement_timeout < Duration::from_secs(1) {
            problems.push("central.statement_timeout: must be at least 1s".into());
        }
        if c.connect_timeout < Duration::from_secs(1) {
            problems.push("central.connect_timeout: must be at least 1s".into());
        }
        if c.keepalive_idle < Duration::from_secs(1) {
            problems.push("central.keepalive_idle: must be at least 1s".into());
        }
        if c.failover_window > Duration::from_secs(86_400) {
            problems.push(format!(
                "central.failover_window: {} is more than 1d (the check reads every event forwarded in it at each reconnect)",
                humantime::format_duration(c.failover_window)
            ));
        }
        if c.ping_interval < Duration::from_millis(500) || c.ping_interval > Duration::from_secs(3600) {
            problems.push("central.ping_interval: must be 500ms..=1h".into());
        }
        if c.answer_timeout < Duration::from_secs(1) || c.answer_timeout > Duration::from_secs(300) {
            problems.push("central.answer_timeout: must be 1s..=5m".into());
        }
    }
}

impl HttpConfig {
    /// The status token read from `status_token_file` (trimmed), if set.
    pub fn status_token(&self) -> Result<Option<String>, String> {
        let Some(path) = &self.status_token_file else { return Ok(None) };
        let t = std::fs::read_to_string(path).map_err(|e| format!("http.status_token_file {}: {e}", path.display()))?;
        let t = t.trim();
        if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "http.status_token_file {}: the token must be at least 16 printable characters without spaces",
                path.display()
            ));
        }
        Ok(Some(t.to_string()))
    }
}
