//! Bytes → the HTTP batch parsers (`parse_array`, `parse_ndjson`) → validate
//! each item. Never panics; NDJSON never yields more than `max_batch` items.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::event::{InputLimits, validate};
use outpost::ingest::http::{parse_array, parse_ndjson};

const LIMITS: InputLimits = InputLimits {
    max_payload_bytes: 64 * 1024,
    max_payload_depth: 32,
    max_future_skew: std::time::Duration::from_secs(3600),
    max_event_age: std::time::Duration::from_secs(30 * 86_400),
};
const MAX_BATCH: usize = 1000;
const NOW_US: i64 = 1_764_000_000_000_000;

fuzz_target!(|data: &[u8]| {
    if let Ok(items) = parse_array(data) {
        for input in items {
            let _ = validate(input, "acme", "site-a", LIMITS, NOW_US);
        }
    }
    if let Ok(items) = parse_ndjson(data, MAX_BATCH) {
        assert!(items.len() <= MAX_BATCH);
        for input in items {
            let _ = validate(input, "acme", "site-a", LIMITS, NOW_US);
        }
    }
    // A small cap reaches the batch_too_large branch.
    let _ = parse_ndjson(data, 2);
});
