//! The central LISTEN connection: other sites' events of the tenants someone
//! at this site subscribes to ([`Interest`]: WebSocket, SSE, long-poll or
//! MQTT, and for [`LISTEN_LINGER`] after the last one leaves). A tenant
//! nobody here watches is not listened to and nothing of it is fetched.
//!
//! On a notification it fetches the new rows (by site id + seq range for
//! `per_batch`, by id for `per_row`), at most one round per
//! [`FETCH_EVERY`]; a `per_batch` tenant busier than that is unlistened and
//! read from the cursors each round instead (see [`Conn::muted`]). It skips
//! this site's own rows, and stores the
//! rest in the site log as remote events (already forwarded, so never sent
//! back up; duplicates by id are skipped). The writer then hands them to the
//! hub, and the hub to MQTT subscribers. Each (tenant, site) has a cursor in
//! the log; after every (re)connect the listener first LISTENs, then catches
//! up from the cursors, so nothing is missed in between (what arrives twice is
//! deduplicated by id). Notifications carry ranges or ids, never payloads, so
//! nothing large goes through NOTIFY.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::interest::Interest;
use crate::central::{Backoff, Connector, schema as central_schema};
use crate::config::{CentralConfig, NotifyMode};
use crate::event::Event;
use crate::log::{self, LogHandle, Readers, RemoteEvent};
use crate::metrics::Metrics;

/// Notifications merged into one round of fetches at most.
const MAX_BURST: usize = 4096;
/// One round of fetches per this at most: what is announced within it waits
/// for the next round and is fetched with the rest, one query per tenant.
/// A quiet fleet is fetched at once; a busy one costs central a query per
/// subscribing site and tenant every `FETCH_EVERY`, not one per batch any
/// site commits.
const FETCH_EVERY: Duration = Duration::from_millis(50);
/// A muted tenant is listened to again after this many rounds in a row
/// found nothing. One would do for correctness, but LISTEN registers the
/// backend for every commit that notifies in the database, any tenant's:
/// a tenant with a few events per round would go back and forth, and be
/// woken by the whole fleet's commits in between.
const QUIET_ROUNDS: u32 = 3;
/// Rows fetched per catch-up query.
const CATCHUP_PAGE: i64 = 5000;
/// A (tenant, site) never seen before is caught up only this far back (by
/// the rows' `received_at`); one with a cursor from the cursor on.
const FIRST_CATCHUP: Duration = Duration::from_secs(3600);
/// A tenant stays listened to this long after its last local subscriber
/// left (a long-poll client between requests, a device reconnecting).
pub(crate) const LISTEN_LINGER: Duration = Duration::from_secs(60);
/// How often at most the listener looks again at which tenants are wanted
/// (and pings central, every `central.ping_interval` if sooner).
const TENANT_POLL: Duration = Duration::from_secs(5);

/// Why the LISTEN connection failed (it reconnects with backoff).
pub(crate) use crate::central::StageError as Error;

/// How a LISTEN connection's life ended without an error.
enum Ended {
    /// The server closed it.
    Closed,
    /// Nobody here subscribes any more: closed on purpose.
    Idle,
}

/// The LISTEN stage.
pub(crate) struct Listener {
    pub connector: Connector,
    pub config: CentralConfig,
    pub site_id: String,
    pub log: LogHandle,
    pub readers: Readers,
    pub metrics: Arc<Metrics>,
    pub interest: Arc<Interest>,
}

const COLUMNS: &str = "id, device_id, event_type, payload::text, \"timestamp\", site_id, site_seq, coalesce(received_at, \"timestamp\"), properties::text";

fn remote(tenant: &str, row: &tokio_postgres::Row) -> RemoteEvent {
    let us = crate::event::to_us;
    let ts: Option<time::OffsetDateTime> = row.get(4);
    let received: Option<time::OffsetDateTime> = row.get(7);
    let site: Option<String> = row.get(5);
    RemoteEvent {
        event: Event {
            id: row.get(0),
            tenant: tenant.to_string(),
            device_id: row.get(1),
            event_type: row.get(2),
            payload: row.get(3),
            timestamp_us: ts.map_or(0, us),
            received_at_us: received.map_or(0, us),
            origin_site: site.unwrap_or_default(),
            properties: row.get(8),
        },
        site_seq: row.get::<_, Option<i64>>(6).unwrap_or(0),
    }
}

/// One round's seq ranges of a tenant, as the fetch's three array
/// parameters: range `i` is `firsts[i]..=lasts[i]` of site `sites[i]`.
#[derive(Default)]
struct Ranges {
    sites: Vec<String>,
    firsts: Vec<i64>,
    lasts: Vec<i64>,
}

/// Sorted seq ranges with the overlapping and adjacent ones merged.
fn coalesce(mut spans: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    spans.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::with_capacity(spans.len());
    for (first, last) in spans {
        match out.last_mut() {
            Some(prev) if first <= prev.1.saturating_add(1) => prev.1 = prev.1.max(last),
            _ => out.push((first, last)),
        }
    }
    out
}

impl Listener {
    /// Listens until `shutdown`, reconnecting with backoff.
    pub(crate) async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let mut backoff = Backoff::new(Duration::from_millis(100), self.config.max_backoff);
        loop {
            if self.wanted().is_empty() {
                // Nobody here subscribes: no connection at all (a fleet's
                // central holds one per watching site, not one per site)
                // until a tenant gains a subscriber. Nothing is missed: the
                // catch-up after LISTEN covers the time in between.
                self.metrics.listen_up.set(1);
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = self.interest.changed() => continue,
                }
            }
            let result = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.session(&mut backoff) => r,
            };
            self.metrics.remote_muted_tenants.set(0);
            if matches!(result, Ok(Ended::Idle)) {
                tracing::debug!("no local subscriber left: LISTEN connection closed");
                continue;
            }
            self.metrics.listen_up.set(0);
            let mut delay = backoff.next_delay();
            if result.as_ref().is_err_and(Error::is_no_answer) {
                // Silence costs central nothing: look again soon.
                delay = delay.min(Duration::from_secs(1));
            }
            match result {
                Ok(_) => tracing::warn!(
                    retry_in_ms = delay.as_millis() as u64,
                    "central LISTEN connection closed; reconnecting"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "central LISTEN failed; reconnecting")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Tenants with a local subscriber (or one within the linger).
    fn wanted(&self) -> HashSet<String> {
        self.interest.wanted(LISTEN_LINGER).into_iter().filter(|t| central_schema::schema_name(t).is_ok()).collect()
    }

    /// One connection's life; returns when it closes, or when the site has
    /// had no subscriber for [`LISTEN_LINGER`].
    async fn session(&self, backoff: &mut Backoff) -> Result<Ended, Error> {
        let (client, mut notes) = self.connect().await?;
        let mut conn = Conn::default();
        let mute = self.config.notify == NotifyMode::PerBatch;
        // Pings keep a silent partition from passing for a live connection.
        let mut tick = tokio::time::interval(TENANT_POLL.min(self.config.ping_interval));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.metrics.remote_muted_tenants.set(conn.muted.len() as i64);
            let wanted = self.wanted();
            if wanted.is_empty() {
                return Ok(Ended::Idle);
            }
            for t in conn.listening.difference(&wanted).cloned().collect::<Vec<_>>() {
                if conn.muted.remove(&t).is_none() {
                    set_listening(&client, &t, false).await?;
                }
                conn.listening.remove(&t);
                tracing::debug!(tenant = t, "no local subscriber: stopped listening");
            }
            let new: Vec<String> = wanted.into_iter().filter(|t| !conn.listening.contains(t)).collect();
            for t in &new {
                set_listening(&client, t, true).await?;
            }
            // Catch up after LISTEN: the window between is covered by both.
            for t in new {
                let n = self.catch_up(&client, &mut conn, &t, Via::CatchUp).await?;
                if n > 0 {
                    tracing::info!(tenant = t, rows = n, "caught up remote events");
                }
                conn.listening.insert(t);
            }
            self.metrics.listen_up.set(1);
            backoff.reset();
            let due = conn.next_round;
            let mut burst = Vec::new();
            tokio::select! {
                n = notes.recv() => match n {
                    Some(note) => burst.push(note),
                    None => return Ok(Ended::Closed),
                },
                _ = tick.tick() => crate::central::connect::ping(&client, self.config.answer_timeout).await?,
                _ = self.interest.changed() => {}
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if !conn.muted.is_empty() => {}
            }
            let early = due.is_some_and(|d| tokio::time::Instant::now() < d);
            if early && !burst.is_empty() && !mute {
                // `per_row`: the notifications are all there is to fetch
                // by, so gather them until the round is due.
                let due = due.unwrap_or_else(tokio::time::Instant::now);
                while burst.len() < MAX_BURST {
                    tokio::select! {
                        n = notes.recv() => match n {
                            Some(note) => burst.push(note),
                            None => return Ok(Ended::Closed),
                        },
                        _ = tokio::time::sleep_until(due) => break,
                    }
                }
            }
            // With what queued up meanwhile.
            while burst.len() < MAX_BURST
                && let Ok(note) = notes.try_recv()
            {
                burst.push(note);
            }
            self.metrics.remote_notifications.inc_by(burst.len() as u64);
            if early && mute {
                for t in tenants_of(&burst) {
                    if conn.listening.contains(t) && !conn.muted.contains_key(t) {
                        set_listening(&client, t, false).await?;
                        conn.muted.insert(t.to_string(), 0);
                    }
                }
                continue;
            }
            if !burst.is_empty() || !conn.muted.is_empty() {
                self.round(&client, &mut conn, burst).await?;
            }
        }
    }

    /// One round: the muted tenants fetched from their cursors, the rest by
    /// what the notifications name. A muted tenant stays muted (its next
    /// round comes FETCH_EVERY later, as it would have) until
    /// [`QUIET_ROUNDS`] rounds in a row found nothing; then it is listened
    /// to again, and read once more for what came between.
    async fn round(
        &self,
        client: &tokio_postgres::Client,
        conn: &mut Conn,
        mut burst: Vec<(String, String)>,
    ) -> Result<(), Error> {
        let started = tokio::time::Instant::now();
        let due_now: Vec<(String, u32)> = conn.muted.drain().collect();
        burst.retain(|(channel, _)| tenant_of(channel).is_none_or(|t| !due_now.iter().any(|(b, _)| b == t)));
        for (t, quiet) in due_now {
            let quiet = if self.catch_up(client, conn, &t, Via::Round).await? > 0 { 0 } else { quiet + 1 };
            if quiet < QUIET_ROUNDS {
                conn.muted.insert(t, quiet);
                continue;
            }
            set_listening(client, &t, true).await?;
            self.catch_up(client, conn, &t, Via::Round).await?;
        }
        if !burst.is_empty() {
            self.on_notifications(client, &mut conn.prepared, &burst).await?;
        }
        // The next round is due FETCH_EVERY after this one began, and at
        // least half of it after this one ended: what was announced while
        // a slow round ran (a busy site) is early, so it mutes its tenant
        // instead of starting a round per notification, and a site that
        // cannot keep up does not read central back to back.
        let now = tokio::time::Instant::now();
        conn.next_round = Some((started + FETCH_EVERY).max(now + FETCH_EVERY / 2));
        Ok(())
    }

    async fn connect(&self) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<(String, String)>), Error> {
        let (client, mut connection) = self.connector.connect_raw("outpost-listen").await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(msg) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match msg {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        if tx.send((n.channel().to_string(), n.payload().to_string())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "LISTEN connection ended");
                        return;
                    }
                }
            }
        });
        // The fetches are prepared, parsed and planned once per
        // connection: planning them was a third of what a listening site
        // cost central. Every scan of this connection's statements is a
        // range of the (site_id, site_seq) index, and without seq scans a
        // plan made while a partition was nearly empty (a full scan per
        // range) cannot be the one kept as it grows. A partition added
        // later invalidates the plan and it is made again. No JIT: these
        // statements read a few rows, and the penalty that keeps seq scans
        // out puts their cost past `jit_above_cost` (a 0.3 s compile each).
        client
            .batch_execute("SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off; SET jit = off")
            .await?;
        Ok((client, rx))
    }

    /// Fetches what a burst of notifications names, merged: one query per
    /// tenant over the union of each origin site's seq ranges (`per_batch`;
    /// prepared once per connection), one per tenant for their ids
    /// (`per_row`), and one site-log commit for all of it. A busy fleet
    /// sends hundreds of notifications a second; one fetch and one fsync
    /// each would fall behind.
    async fn on_notifications(
        &self,
        client: &tokio_postgres::Client,
        prepared: &mut HashMap<String, tokio_postgres::Statement>,
        notes: &[(String, String)],
    ) -> Result<(), Error> {
        let mut ranges: BTreeMap<(&str, String), Vec<(i64, i64)>> = BTreeMap::new();
        let mut ids: BTreeMap<&str, Vec<uuid::Uuid>> = BTreeMap::new();
        for (channel, payload) in notes {
            let Some(tenant) = tenant_of(channel) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(payload) else {
                tracing::warn!(channel, "unreadable notification ignored");
                continue;
            };
            if let Some(site) = v["site_id"].as_str() {
                if site == self.site_id {
                    continue;
                }
                let (first, last) = (v["first_seq"].as_i64().unwrap_or(0), v["last_seq"].as_i64().unwrap_or(0));
                ranges.entry((tenant, site.to_string())).or_default().push((first, last));
            } else if let Some(id) = v["id"].as_str().and_then(|s| uuid::Uuid::parse_str(s).ok()) {
                ids.entry(tenant).or_default().push(id);
            }
        }
        let mut events: Vec<RemoteEvent> = Vec::new();
        // Per tenant: the sites and their ranges as three arrays. Overlapping
        // or adjacent ranges become one; a gap (say, an old range sent again
        // by a retry beside current traffic) stays a gap, so no range spans
        // rows nobody announced.
        let mut by_tenant: BTreeMap<&str, Ranges> = BTreeMap::new();
        for ((tenant, site), spans) in ranges {
            let r = by_tenant.entry(tenant).or_default();
            for (first, last) in coalesce(spans) {
                r.sites.push(site.clone());
                r.firsts.push(first);
                r.lasts.push(last);
            }
        }
        for (tenant, Ranges { sites, firsts, lasts }) in by_tenant {
            let schema = central_schema::schema_name(tenant)?;
            // Each range is an index scan of its own (the LATERAL subquery
            // is not flattened into a join, which on a young table the
            // planner makes a full scan).
            let sql = format!(
                "SELECT e.* FROM unnest($1::text[], $2::int8[], $3::int8[]) WITH ORDINALITY AS r(site, first_seq, last_seq, n)
                 CROSS JOIN LATERAL (
                   SELECT {COLUMNS} FROM {schema}.events
                   WHERE site_id = r.site AND site_seq BETWEEN r.first_seq AND r.last_seq
                   ORDER BY site_seq) AS e
                 ORDER BY r.n, 7"
            );
            let statement = crate::central::connect::prepared(client, prepared, &sql, &[]).await?;
            self.metrics.remote_fetches.inc();
            let rows = client.query(&statement, &[&sites, &firsts, &lasts]).await?;
            events.extend(rows.iter().map(|r| remote(tenant, r)));
        }
        for (tenant, ids) in ids {
            let schema = central_schema::schema_name(tenant)?;
            self.metrics.remote_fetches.inc();
            let rows = client
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM {schema}.events WHERE id = ANY($1) AND site_id IS DISTINCT FROM $2"
                    ),
                    &[&ids, &self.site_id],
                )
                .await?;
            events.extend(rows.iter().map(|r| remote(tenant, r)));
        }
        self.store(Via::Round, events).await?;
        Ok(())
    }

    /// Copies what other sites committed after our cursors, up to what the
    /// tenant's `sites` table says each has committed: one statement for all
    /// sites (a range scan each, [`CATCHUP_PAGE`] rows a site at most, again
    /// while a page comes back full). A site never seen before is read only
    /// [`FIRST_CATCHUP`] back, once; what that found (or, when it found
    /// nothing, the site's seq then) is its floor in [`Conn::floors`] until
    /// it has a cursor in the log.
    async fn catch_up(
        &self,
        client: &tokio_postgres::Client,
        conn: &mut Conn,
        tenant: &str,
        via: Via,
    ) -> Result<usize, Error> {
        let schema = central_schema::schema_name(tenant)?;
        // Sites with a cursor: their rows past it up to `sites.last_seq`.
        // Sites without one: a row each, id NULL, with their `last_seq`.
        // `sites` is read once (one scan, hashed against the cursors),
        // not probed by index per cursor.
        let sql = format!(
            "WITH k AS MATERIALIZED (
               SELECT s.site_id, s.last_seq, c.after FROM {schema}.sites s
               LEFT JOIN unnest($1::text[], $2::int8[]) AS c(site, after) ON c.site = s.site_id
               WHERE s.site_id <> $4)
             SELECT e.* FROM k CROSS JOIN LATERAL (
                 SELECT {COLUMNS} FROM {schema}.events
                 WHERE site_id = k.site_id AND site_seq > k.after AND site_seq <= k.last_seq
                 ORDER BY site_seq LIMIT $3) AS e
             WHERE k.last_seq > k.after
             UNION ALL
             SELECT NULL::uuid, NULL::varchar, NULL::varchar, NULL::text, NULL::timestamptz, k.site_id, k.last_seq,
                    NULL::timestamptz, NULL::text
             FROM k WHERE k.after IS NULL
             ORDER BY 6, 7"
        );
        let statement = match crate::central::connect::prepared(client, &mut conn.prepared, &sql, &[]).await {
            Ok(statement) => statement,
            // The tenant's schema (or its sites table) does not exist yet:
            // nothing to catch up.
            Err(e) if matches!(e.code().map(|c| c.code()), Some("42P01" | "3F000")) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let mut total = 0;
        loop {
            let t = tenant.to_string();
            let mut cursors = self.readers.with(move |c| log::schema::remote_cursors(c, &t)).await?;
            for ((t, site), floor) in &conn.floors {
                if t == tenant {
                    let at = cursors.entry(site.clone()).or_insert(*floor);
                    *at = (*at).max(*floor);
                }
            }
            let (sites, afters): (Vec<String>, Vec<i64>) = cursors.into_iter().unzip();
            self.metrics.remote_fetches.inc();
            let rows = client.query(&statement, &[&sites, &afters, &CATCHUP_PAGE, &self.site_id]).await?;
            let mut per_site: HashMap<&str, i64> = HashMap::new();
            let mut unseen = Vec::new();
            let mut events = Vec::with_capacity(rows.len());
            for row in &rows {
                let site: &str = row.get(5);
                if row.get::<_, Option<uuid::Uuid>>(0).is_none() {
                    unseen.push((site.to_string(), row.get::<_, i64>(6)));
                } else {
                    *per_site.entry(site).or_default() += 1;
                    events.push(remote(tenant, row));
                }
            }
            total += self.store(via, events).await?;
            for (site, last_seq) in unseen {
                let (n, last) = self.first_catch_up(client, tenant, &site, via).await?;
                total += n;
                conn.floors.insert((tenant.to_string(), site), last.unwrap_or(last_seq).max(last_seq));
            }
            // A site whose page came back full goes on from its new cursor.
            if !per_site.values().any(|&n| n == CATCHUP_PAGE) {
                return Ok(total);
            }
        }
    }

    /// A site never seen before: its rows of the last [`FIRST_CATCHUP`],
    /// paged; returns how many were new and the last seq read.
    async fn first_catch_up(
        &self,
        client: &tokio_postgres::Client,
        tenant: &str,
        site: &str,
        via: Via,
    ) -> Result<(usize, Option<i64>), Error> {
        let schema = central_schema::schema_name(tenant)?;
        let since = time::OffsetDateTime::now_utc() - FIRST_CATCHUP;
        let (mut total, mut after) = (0, None);
        loop {
            self.metrics.remote_fetches.inc();
            let from_seq = after.unwrap_or_default();
            let (cond, from): (&str, &(dyn tokio_postgres::types::ToSql + Sync)) = match after {
                Some(_) => ("site_seq > $2", &from_seq),
                None => ("received_at > $2", &since),
            };
            let rows = client
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM {schema}.events
                         WHERE site_id = $1 AND {cond} ORDER BY site_seq LIMIT $3"
                    ),
                    &[&site, from, &CATCHUP_PAGE],
                )
                .await?;
            let Some(last) = rows.last() else { return Ok((total, after)) };
            let Some(seq) = last.get::<_, Option<i64>>(6) else { return Ok((total, after)) };
            after = Some(seq);
            let full = rows.len() as i64 == CATCHUP_PAGE;
            total += self.store(via, rows.iter().map(|r| remote(tenant, r)).collect()).await?;
            if !full {
                return Ok((total, after));
            }
        }
    }

    /// Stores other sites' rows in the site log; returns how many were new.
    async fn store(&self, via: Via, mut events: Vec<RemoteEvent>) -> Result<usize, Error> {
        events.retain(|r| r.event.origin_site != self.site_id);
        if events.is_empty() {
            return Ok(0);
        }
        let n = self.log.append_remote(events).await?;
        match via {
            Via::CatchUp => self.metrics.remote_catchup_rows.inc_by(n as u64),
            Via::Round => self.metrics.remote_events.inc_by(n as u64),
        };
        Ok(n)
    }
}

/// What one LISTEN connection keeps besides its client.
#[derive(Default)]
struct Conn {
    /// Tenants listened to (or muted) on this connection.
    listening: HashSet<String>,
    /// Tenants whose channel this connection left (`per_batch` only).
    /// Every commit that notifies wakes every backend listening in the
    /// database and sends it the notification: hundreds a second for each
    /// subscribing site at a fleet's central, for fetches that run once per
    /// FETCH_EVERY. So a tenant that announces something before its round
    /// is due is unlistened, and read every FETCH_EVERY from the cursors to
    /// what its `sites` table says was committed, until [`QUIET_ROUNDS`]
    /// rounds in a row found no news; then it is listened to again, and
    /// read once more for what came between, so nothing is missed. The
    /// value is how many rounds in a row found nothing.
    muted: HashMap<String, u32>,
    /// Where the catch-up goes on for sites read once without a cursor:
    /// (tenant, site) → seq.
    floors: HashMap<(String, String), i64>,
    /// Statements prepared on this connection, by their text.
    prepared: HashMap<String, tokio_postgres::Statement>,
    /// When the next round of fetches may run (none yet: at once).
    next_round: Option<tokio::time::Instant>,
}

/// How rows were fetched, for the metrics.
#[derive(Clone, Copy)]
enum Via {
    /// After a (re)connect or a new subscriber's tenant.
    CatchUp,
    /// A fetch round.
    Round,
}

/// `LISTEN` on the tenant's channel, or `UNLISTEN` when `on` is false.
async fn set_listening(client: &tokio_postgres::Client, tenant: &str, on: bool) -> Result<(), Error> {
    let verb = if on { "LISTEN" } else { "UNLISTEN" };
    client.batch_execute(&format!("{verb} {}", central_schema::channel_name(tenant)?)).await?;
    Ok(())
}

/// The tenant of a notification channel (`tenant_<t>_events`).
fn tenant_of(channel: &str) -> Option<&str> {
    channel.strip_prefix("tenant_").and_then(|c| c.strip_suffix("_events"))
}

/// The tenants a burst of notifications names, each once.
fn tenants_of(burst: &[(String, String)]) -> std::collections::BTreeSet<&str> {
    burst.iter().filter_map(|(channel, _)| tenant_of(channel)).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_overlapping_or_adjacent_ranges_merge() {
        let merged = super::coalesce(vec![(11, 20), (1, 10), (5, 7), (1_000_000, 1_000_010), (21, 21)]);
        assert_eq!(merged, [(1, 21), (1_000_000, 1_000_010)]);
        assert!(super::coalesce(Vec::new()).is_empty());
    }
}
