//! systemd integration: `READY=1` once migrations ran and sockets are bound,
//! a watchdog fed only while the site-log writer answers, `STOPPING=1` on
//! shutdown. Every call is a no-op outside systemd (no `NOTIFY_SOCKET`).

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::log::LogHandle;

/// Tells systemd the appliance is ready.
pub(crate) fn ready() {
    notify(&[NotifyState::Ready]);
}

/// Tells systemd the appliance is stopping.
pub(crate) fn stopping() {
    notify(&[NotifyState::Stopping]);
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Pings the watchdog at half its interval, but only after a round trip
/// through the site-log writer succeeds: a wedged writer gets us restarted.
pub(crate) async fn run_watchdog(log: LogHandle, shutdown: CancellationToken) -> Result<(), std::io::Error> {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return Ok(());
    }
    let period = Duration::from_micros(usec / 2);
    tracing::info!(period_ms = period.as_millis() as u64, "systemd watchdog enabled");
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        match tokio::time::timeout(period, log.ping()).await {
            Ok(Ok(())) => notify(&[NotifyState::Watchdog]),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "watchdog: site log writer failed; not feeding the watchdog")
            }
            Err(_) => tracing::error!("watchdog: site log writer did not answer; not feeding the watchdog"),
        }
    }
}
