//! Retention: forwarded rows older than `log.retention` are deleted, in
//! chunks so the writer is never held long. Pending rows are never touched.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Error, LogHandle};
use crate::event::now_us;

/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Rows deleted per prune transaction.
const PRUNE_CHUNK: usize = 5000;

/// Prunes every `PRUNE_EVERY` until `shutdown`. A failed prune is logged and
/// retried at the next tick.
pub async fn run(log: LogHandle, retention: Duration, shutdown: CancellationToken) -> Result<(), Error> {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let cutoff = now_us().saturating_sub(i64::try_from(retention.as_micros()).unwrap_or(i64::MAX));
        let mut total = 0;
        loop {
            match log.prune(cutoff, PRUNE_CHUNK).await {
                Ok(n) => {
                    total += n;
                    if n < PRUNE_CHUNK || shutdown.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention prune failed; will retry");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(rows = total, "retention pruned forwarded events");
        }
    }
}
