//! Arbitrary bytes → `EventInput` (serde) → `event::validate`. Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::event::{EventInput, InputLimits, validate};

/// The shipped defaults (`limits.max_payload_bytes`, `limits.max_payload_depth`).
const LIMITS: InputLimits = InputLimits {
    max_payload_bytes: 64 * 1024,
    max_payload_depth: 32,
    max_future_skew: std::time::Duration::from_secs(3600),
    max_event_age: std::time::Duration::from_secs(30 * 86_400),
};
const NOW_US: i64 = 1_764_000_000_000_000;

fuzz_target!(|data: &[u8]| {
    if let Ok(input) = serde_json::from_slice::<EventInput>(data) {
        if let Ok(event) = validate(input, "acme", "site-a", LIMITS, NOW_US) {
            assert!(event.payload.len() <= LIMITS.max_payload_bytes);
            assert!(event.payload.starts_with('{'));
            let _ = event.size_hint();
        }
    }
});
