//! The one ingest path shared by HTTP, WebSocket and MQTT: validate every
//! event, check the device may write it, charge the rate limiter, and append
//! to the site log. Returns only after the commit, so the caller's ack means
//! durable. A refusal at any step writes nothing.

pub mod http;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use crate::auth::Principal;
use crate::event::{Event, EventInput, InputLimits, Invalid, now_us, validate};
use crate::limits::{Limited, Limiter};
use crate::log::{self, Appended, LogHandle};
use crate::metrics::{Metrics, Protocol, ProtocolLabel};

/// What a client is told to wait when the log is full.
pub const FULL_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Why events were refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}{}", index.map(|i| format!("event {i}: ")).unwrap_or_default(), invalid)]
    Invalid { index: Option<usize>, invalid: Invalid },
    #[error("{}device_id {device_id:?} is not the token's device", index.map(|i| format!("event {i}: ")).unwrap_or_default())]
    OtherDevice { index: Option<usize>, device_id: String },
    #[error("batch of {got} events exceeds limits.max_batch = {max}")]
    BatchTooLarge { got: usize, max: usize },
    #[error("batch is empty")]
    EmptyBatch,
    #[error("rate limit {} = {} exceeded; retry in {:.1}s", .0.window.as_str(), .0.limit, .0.retry_after.as_secs_f64())]
    RateLimited(Limited),
    #[error("site log is full ({used} of {budget} bytes); retry later")]
    Full { used: u64, budget: u64 },
    #[error("{}id {id} is already used by another device", index.map(|i| format!("event {i}: ")).unwrap_or_default())]
    IdConflict { index: Option<usize>, id: uuid::Uuid },
    /// A gateway's publish for a device it may not publish for (`quota`:
    /// one child over `mqtt.gateway_max_children`).
    #[error("{why}")]
    ChildRefused { why: String, quota: bool },
    #[error("site log unavailable: {0}")]
    Unavailable(log::Error),
}

impl Error {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Invalid { .. } | Error::BatchTooLarge { .. } | Error::EmptyBatch => "invalid",
            Error::OtherDevice { .. } | Error::ChildRefused { .. } => "forbidden",
            Error::RateLimited(_) => "rate_limited",
            Error::Full { .. } => "log_full",
            Error::IdConflict { .. } => "id_conflict",
            Error::Unavailable(_) => "unavailable",
        }
    }
}

/// Cheap, cloneable front door to the site log.
#[derive(Clone)]
pub struct IngestHandle {
    inner: Arc<Inner>,
}

struct Inner {
    log: LogHandle,
    limiter: Limiter,
    metrics: Arc<Metrics>,
    site_id: String,
    input_limits: InputLimits,
    max_batch: usize,
}

impl IngestHandle {
    /// Builds the ingest path over a running log writer.
    pub fn new(
        log: LogHandle,
        limiter: Limiter,
        metrics: Arc<Metrics>,
        site_id: String,
        input_limits: InputLimits,
        max_batch: usize,
    ) -> Self {
        Self { inner: Arc::new(Inner { log, limiter, metrics, site_id, input_limits, max_batch }) }
    }

    /// Most events accepted in one batch.
    pub fn max_batch(&self) -> usize {
        self.inner.max_batch
    }

    /// Charges the rate limiter for `n` events without submitting them (MQTT
    /// checks first and, when limited, stops reading instead of refusing).
    pub fn check_rate(&self, tenant: &str, device_id: &str, n: u32) -> Result<(), Limited> {
        self.inner.limiter.check(tenant, device_id, n)
    }

    /// `check_rate` for events that count for two devices (a gateway's
    /// child and the gateway): neither is charged unless both admit them.
    pub fn check_rate_pair(&self, tenant: &str, child: &str, gateway: &str, n: u32) -> Result<(), Limited> {
        self.inner.limiter.check_pair(tenant, child, gateway, n)
    }

    /// The site log, for presence updates and its full flag.
    pub fn log(&self) -> &LogHandle {
        &self.inner.log
    }

    /// Counts a refusal decided outside `submit` (e.g. an MQTT ACL).
    pub fn count_rejected(&self, protocol: Protocol, reason: &'static str) {
        self.inner.metrics.reject(protocol, reason, 1);
    }

    /// Validates, authorizes, rate-limits and durably appends `inputs` as one
    /// all-or-nothing unit. `batch` says whether errors name an item index.
    pub async fn submit(
        &self,
        principal: &Principal,
        tenant: &str,
        inputs: Vec<EventInput>,
        batch: bool,
        protocol: Protocol,
    ) -> Result<Vec<Appended>, Error> {
        self.submit_with(principal, tenant, inputs, batch, protocol, true).await
    }

    /// `submit`, with the rate limiter charged here or (`charge_rate =
    /// false`) already by the caller through `check_rate`.
    pub async fn submit_with(
        &self,
        principal: &Principal,
        tenant: &str,
        inputs: Vec<EventInput>,
        batch: bool,
        protocol: Protocol,
        charge_rate: bool,
    ) -> Result<Vec<Appended>, Error> {
        let n = inputs.len();
        let result = self.submit_inner(principal, tenant, inputs, batch, charge_rate).await;
        self.count(protocol, n, result.as_deref());
        result
    }

    /// MQTT publishes (or a will), each with what it records beside its
    /// event in the same transaction: each validated and authorized like
    /// any event and answered on its own, in order (one refused takes no
    /// other with it); the rate limiter already charged by the caller
    /// through `check_rate`. A connection's publishes read together go to
    /// the log as one request.
    pub async fn submit_mqtt(
        &self,
        principal: &Principal,
        tenant: &str,
        inputs: Vec<(EventInput, Box<log::mqtt::Facts>)>,
    ) -> Vec<Result<Appended, Error>> {
        let answers = self.submit_mqtt_inner(principal, tenant, inputs).await;
        for a in &answers {
            self.count(Protocol::Mqtt, 1, a.as_ref().map(std::slice::from_ref));
        }
        answers
    }

    /// The ingest metrics of one submit of `n` events.
    fn count(&self, protocol: Protocol, n: usize, result: Result<&[Appended], &Error>) {
        let m = &self.inner.metrics;
        let label = ProtocolLabel { protocol: protocol.as_str() };
        match result {
            Ok(appended) => {
                let dup = appended.iter().filter(|a| a.duplicate).count() as u64;
                m.events_accepted.get_or_create(&label).inc_by(appended.len() as u64 - dup);
                if dup > 0 {
                    m.events_duplicate.get_or_create(&label).inc_by(dup);
                }
            }
            Err(e) => m.reject(protocol, e.reason(), n.max(1) as u64),
        }
    }

    async fn submit_inner(
        &self,
        principal: &Principal,
        tenant: &str,
        inputs: Vec<EventInput>,
        batch: bool,
        charge_rate: bool,
    ) -> Result<Vec<Appended>, Error> {
        let inner = &self.inner;
        if inputs.is_empty() {
            return Err(Error::EmptyBatch);
        }
        if inputs.len() > inner.max_batch {
            return Err(Error::BatchTooLarge { got: inputs.len(), max: inner.max_batch });
        }
        let index = |i: usize| batch.then_some(i);
        let now = now_us();
        let mut events = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.into_iter().enumerate() {
            events.push(self.accept(principal, tenant, input, index(i), now)?);
        }
        // Charge each device once for all its events in this unit.
        let mut counts: Vec<(&str, u32)> = Vec::new();
        for e in &events {
            match counts.iter_mut().find(|(d, _)| *d == e.device_id) {
                Some((_, c)) => *c += 1,
                None => counts.push((&e.device_id, 1)),
            }
        }
        if charge_rate {
            for (device, count) in counts {
                inner.limiter.check(tenant, device, count).map_err(Error::RateLimited)?;
            }
        }
        inner.log.append(events).await.map_err(|e| log_error(e, index))
    }

    async fn submit_mqtt_inner(
        &self,
        principal: &Principal,
        tenant: &str,
        inputs: Vec<(EventInput, Box<log::mqtt::Facts>)>,
    ) -> Vec<Result<Appended, Error>> {
        let now = now_us();
        // Refusals in place; `None` where the log answers.
        let mut answers: Vec<Option<Result<Appended, Error>>> = Vec::with_capacity(inputs.len());
        let mut events = Vec::with_capacity(inputs.len());
        for (input, facts) in inputs {
            if self.inner.max_batch < 1 {
                answers.push(Some(Err(Error::BatchTooLarge { got: 1, max: self.inner.max_batch })));
                continue;
            }
            // A child's event: the session checked that the login is its
            // gateway (`Facts::via`), and the writer checks it again.
            let accepted = match &facts.via {
                Some(via) if principal.device_id() == Some(via.gateway.as_str()) => {
                    validate(input, tenant, &self.inner.site_id, self.inner.input_limits, now)
                        .map_err(|invalid| Error::Invalid { index: None, invalid })
                }
                _ => self.accept(principal, tenant, input, None, now),
            };
            match accepted {
                Ok(event) => {
                    events.push((event, facts));
                    answers.push(None);
                }
                Err(e) => answers.push(Some(Err(e))),
            }
        }
        let n = events.len();
        let mut stored = match events.is_empty() {
            true => Ok(Vec::new()),
            false => self.inner.log.append_mqtt(events).await,
        }
        .map(Vec::into_iter);
        answers
            .into_iter()
            .map(|a| {
                a.unwrap_or_else(|| match &mut stored {
                    Ok(each) => each
                        .next()
                        .unwrap_or_else(|| Err(log::Error::Commit(format!("{n} publishes, fewer answers"))))
                        .map_err(|e| log_error(e, |_| None)),
                    // The whole request failed (commit, writer gone): each publish says so.
                    Err(e) => Err(log_error(e.for_each(), |_| None)),
                })
            })
            .collect()
    }

    /// One input checked against the token's device and validated;
    /// `index` names it in a refusal.
    fn accept(
        &self,
        principal: &Principal,
        tenant: &str,
        input: EventInput,
        index: Option<usize>,
        now: i64,
    ) -> Result<Event, Error> {
        if let Principal::Device { device_id, .. } = principal
            && *device_id != input.device_id
        {
            return Err(Error::OtherDevice { index, device_id: input.device_id });
        }
        validate(input, tenant, &self.inner.site_id, self.inner.input_limits, now)
            .map_err(|invalid| Error::Invalid { index, invalid })
    }
}

/// A refusal of the site log as ingest's; `index` names the event of an id
/// conflict.
fn log_error(e: log::Error, index: impl Fn(usize) -> Option<usize>) -> Error {
    match e {
        log::Error::Full { used, budget } => Error::Full { used, budget },
        log::Error::IdConflict { index: i, id } => Error::IdConflict { index: index(i), id },
        log::Error::ChildRefused { why, quota } => Error::ChildRefused { why, quota },
        other => Error::Unavailable(other),
    }
}
