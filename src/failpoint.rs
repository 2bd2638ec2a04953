//! Crash points for tests, compiled in only with the `failpoints` feature
//! (the product binary has none: `fire` is an empty inline function there).
//!
//! `OUTPOST_FAILPOINT=<name>[:<action>[:<trigger file>]]` arms one point.
//! `action` is `kill` (SIGKILL the process, the default) or `panic` (panic
//! the task that reached it). With a trigger file the point fires only once
//! that file exists, so a test can let the appliance ack events first.

/// Reaches the failpoint `name`.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn fire(_name: &str) {}

/// Reaches the failpoint `name`.
#[cfg(feature = "failpoints")]
pub(crate) fn fire(name: &str) {
    static ARMED: std::sync::OnceLock<Option<(String, String, Option<String>)>> = std::sync::OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        let v = std::env::var("OUTPOST_FAILPOINT").ok()?;
        let mut parts = v.splitn(3, ':');
        let point = parts.next()?.to_string();
        let action = parts.next().unwrap_or("kill").to_string();
        Some((point, action, parts.next().map(str::to_string)))
    });
    let Some((point, action, trigger)) = armed else { return };
    if point != name || trigger.as_ref().is_some_and(|t| !std::path::Path::new(t).exists()) {
        return;
    }
    tracing::warn!(failpoint = name, action, "failpoint reached");
    match action.as_str() {
        "panic" => panic!("failpoint {name}"),
        // SAFETY: signalling our own process; SIGKILL cannot be caught.
        _ => unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        },
    }
}
