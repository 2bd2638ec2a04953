//! WebSocket ingest: an `event` frame on a stream socket becomes one submit,
//! answered by an `ack` frame only after the commit (or an `error` frame
//! naming the field). The socket itself belongs to the stream stage, which
//! hands event frames here through `EventFrames`.

use futures_util::future::BoxFuture;
use serde_json::json;
use serde_json::value::RawValue;

use super::IngestHandle;
use crate::auth::{Perm, Principal};
use crate::event::{EventInput, Tenant};
use crate::http::extract::{Object, parse_json};
use crate::http::{ApiError, EventFrames, error_frame};
use crate::metrics::Protocol;

const PROTOCOL: Protocol = Protocol::WebSocket;

impl EventFrames for IngestHandle {
    fn event_frame<'a>(
        &'a self,
        principal: &'a Principal,
        tenant: &'a Tenant,
        event: &'a RawValue,
    ) -> BoxFuture<'a, String> {
        Box::pin(async move {
            if let Principal::Device { perms, .. } = principal
                && !perms.contains(&Perm::WriteEvents)
            {
                self.count_rejected(PROTOCOL, "forbidden");
                return error_frame("missing_permission", "token lacks permission write_events", None);
            }
            let input = match parse_json::<Object<EventInput>>(event.get().as_bytes()) {
                Ok(Object(i)) => i,
                Err(e) => return error_frame(e.code, &e.message, e.field.as_deref()),
            };
            match self.submit(principal, tenant, vec![input], false, PROTOCOL).await {
                Ok(mut a) => a.pop().map_or_else(
                    || error_frame("internal", "empty result", None),
                    |a| json!({"type": "ack", "id": a.id, "seq": a.seq, "duplicate": a.duplicate}).to_string(),
                ),
                Err(e) => {
                    let api: ApiError = e.into();
                    error_frame(api.code, &api.message, api.field.as_deref())
                }
            }
        })
    }
}
