//! Writes one tenant's batch to the central database in one transaction:
//! COPY BINARY into a temporary stage, then `INSERT … SELECT … ON CONFLICT
//! DO NOTHING`, so a resend never duplicates (the key is `id`, or
//! `(id, "timestamp")` on a partitioned table: a resend carries both).
//! Before the insert, the time partitions the batch needs are made sure of,
//! once per partition and connection.

use std::error::Error as StdError;

use bytes::{BufMut, BytesMut};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_postgres::types::{IsNull, ToSql, Type, accepts, to_sql_checked};

use super::Error;
use crate::central::Connector;
use crate::config::PartitionInterval;
use crate::event::StoredEvent;

/// An open central connection.
pub struct Central {
    client: Client,
    task: JoinHandle<()>,
    interval: PartitionInterval,
    /// Partitions are made only this far back (and one interval ahead).
    window: std::time::Duration,
    /// What each schema written to has, asked once per connection.
    schemas: std::collections::HashMap<String, Schema>,
    /// The inserts prepared on this connection, by their text (`None` when
    /// `central.prepared_statements` is off: every batch sends its text).
    prepared: Option<std::collections::HashMap<String, tokio_postgres::Statement>>,
}

/// A tenant schema's parts that came with later migrations.
struct Schema {
    /// The `sites` table (migration 4).
    sites: bool,
    /// The partitions known to exist (by [`PartitionInterval::bucket`]), or
    /// `None` when the schema predates partitioning (migration 3).
    partitions: Option<std::collections::HashSet<i64>>,
    /// How many partitions `events` has, as last counted.
    partition_count: i64,
}

impl Drop for Central {
    fn drop(&mut self) {
        // A blackholed socket would otherwise linger until keepalives give up.
        self.task.abort();
    }
}

/// Partitions of `schema`.events (the default one included).
async fn count_partitions(client: &Client, schema: &str) -> Result<i64, Error> {
    let sql = "SELECT count(*) FROM pg_inherits WHERE inhparent = to_regclass($1)";
    Ok(client.query_typed_one(sql, &[(&format!("{schema}.events"), Type::TEXT)]).await?.get(0))
}

/// JSON text sent as `jsonb` (binary format: version byte 1, then the text).
#[derive(Debug)]
struct JsonText<'a>(&'a str);

impl ToSql for JsonText<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        if *ty == Type::JSONB {
            out.put_u8(1);
        }
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
    accepts!(JSON, JSONB);
    to_sql_checked!();
}

impl Central {
    /// Opens a connection.
    pub async fn open(connector: &Connector) -> Result<Self, Error> {
        let (client, task) = connector.connect().await?;
        Ok(Central {
            client,
            task,
            interval: connector.partition_interval,
            window: connector.partition_window,
            schemas: Default::default(),
            prepared: connector.prepares.then(Default::default),
        })
    }

    /// `SELECT 1` answered within `within`, or [`crate::central::Error::NoAnswer`].
    pub async fn ping(&self, within: std::time::Duration) -> Result<(), Error> {
        Ok(crate::central::connect::ping(&self.client, within).await?)
    }

    /// True once the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The newest seq of `site` that `schema` holds (`sites.last_seq`):
    /// `Some(0)` when the site has no row there, `None` when the schema has
    /// no `sites` table (before migration 4) or no schema at all.
    pub async fn site_last_seq(&mut self, schema: &str, site: &str) -> Result<Option<i64>, Error> {
        let exists: bool = self
            .client
            .query_typed_one("SELECT to_regclass($1) IS NOT NULL", &[(&format!("{schema}.sites"), Type::TEXT)])
            .await?
            .get(0);
        if !exists {
            return Ok(None);
        }
        let sql = format!("SELECT coalesce(max(last_seq), 0) FROM {schema}.sites WHERE site_id = $1");
        Ok(Some(self.client.query_typed_one(&sql, &[(&site, Type::TEXT)]).await?.get(0)))
    }

    /// The client, for migrations.
    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// What `schema` has: one query, once per connection and schema.
    async fn schema(&mut self, schema: &str) -> Result<&mut Schema, Error> {
        if !self.schemas.contains_key(schema) {
            let row = self
                .client
                .query_typed_one(
                    "SELECT to_regclass($1) IS NOT NULL, to_regprocedure($2) IS NOT NULL",
                    &[
                        (&format!("{schema}.sites"), Type::TEXT),
                        (&format!("{schema}.outpost_ensure_partition(timestamptz,interval,text)"), Type::TEXT),
                    ],
                )
                .await?;
            let partitioned = row.get::<_, bool>(1);
            let count = if partitioned { count_partitions(&self.client, schema).await? } else { 0 };
            let found =
                Schema { sites: row.get(0), partitions: partitioned.then(Default::default), partition_count: count };
            self.schemas.insert(schema.to_string(), found);
        }
        Ok(self.schemas.get_mut(schema).expect("inserted above"))
    }

    /// How many partitions `schema`'s events table had when last counted.
    pub fn partition_count(&self, schema: &str) -> Option<i64> {
        self.schemas.get(schema).map(|s| s.partition_count)
    }

    /// Writes one tenant's rows in one transaction, idempotently.
    pub async fn write(&mut self, schema: &str, rows: &[&StoredEvent]) -> Result<u64, Error> {
        let interval = self.interval;
        // Partitions only within the window: a device's clock (or an old
        // backlog) cannot make more than a few; the rest go to the default
        // partition, which takes any timestamp.
        let window = interval.window(time::OffsetDateTime::now_utc(), self.window);
        let found = self.schema(schema).await?;
        let has_sites = found.sites;
        let mut new_buckets = Vec::new();
        if let Some(known) = &found.partitions {
            for r in rows {
                let b = interval.bucket(r.timestamp);
                if window.contains(&b) && !known.contains(&b) && !new_buckets.iter().any(|(k, _)| *k == b) {
                    new_buckets.push((b, r.timestamp));
                }
            }
        }
        if !new_buckets.is_empty() {
            // Each in its own short transaction, before the batch's: creating
            // a partition locks the whole table, which must not last through
            // a COPY over a slow uplink. A partition that cannot be made
            // (NULL) leaves its rows to the default partition: never an error
            // that blocks the queue.
            let ensure = format!("SELECT {schema}.outpost_ensure_partition($1, {}::interval)", self.interval.sql());
            for (_, at) in &new_buckets {
                self.client.query_typed_one(&ensure, &[(at, Type::TIMESTAMPTZ)]).await?;
            }
            let count = count_partitions(&self.client, schema).await?;
            if let Some(found) = self.schemas.get_mut(schema) {
                found.partition_count = count;
            }
        }
        // One statement, one round trip, no session state (so it works
        // through PgBouncer's transaction pooling): the rows as arrays,
        // unnested into the insert, and the site's row in `sites` (when the
        // schema has it) in the same statement, so in the same transaction.
        let site = rows.iter().max_by_key(|r| r.seq).map(|r| (r.origin_site.as_str(), r.seq));
        let seen = match site {
            Some(_) if has_sites => format!(
                ", seen AS (INSERT INTO {schema}.sites (site_id, last_seen, last_seq) VALUES ($10, now(), $11)
                 ON CONFLICT (site_id) DO UPDATE SET last_seen = now(), last_seq = greatest({schema}.sites.last_seq, excluded.last_seq))"
            ),
            _ => String::new(),
        };
        let sql = format!(
            "WITH ins AS (
               INSERT INTO {schema}.events (id, device_id, event_type, payload, \"timestamp\", site_id, site_seq, received_at, properties)
               SELECT * FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9) ORDER BY 7
               ON CONFLICT DO NOTHING RETURNING 1){seen}
             SELECT count(*) FROM ins"
        );
        let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.id).collect();
        let devices: Vec<&str> = rows.iter().map(|r| r.device_id.as_str()).collect();
        let types: Vec<&str> = rows.iter().map(|r| r.event_type.as_str()).collect();
        let payloads: Vec<JsonText<'_>> = rows.iter().map(|r| JsonText(r.payload.get())).collect();
        let times: Vec<time::OffsetDateTime> = rows.iter().map(|r| r.timestamp).collect();
        let sites: Vec<&str> = rows.iter().map(|r| r.origin_site.as_str()).collect();
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        let received: Vec<time::OffsetDateTime> = rows.iter().map(|r| r.received_at).collect();
        let props: Vec<Option<JsonText<'_>>> =
            rows.iter().map(|r| r.properties.as_ref().map(|p| JsonText(p.get()))).collect();
        let (site_id, last_seq) = site.unwrap_or_default();
        let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
            (&ids, Type::UUID_ARRAY),
            (&devices, Type::TEXT_ARRAY),
            (&types, Type::TEXT_ARRAY),
            (&payloads, Type::JSONB_ARRAY),
            (&times, Type::TIMESTAMPTZ_ARRAY),
            (&sites, Type::TEXT_ARRAY),
            (&seqs, Type::INT8_ARRAY),
            (&received, Type::TIMESTAMPTZ_ARRAY),
            (&props, Type::JSONB_ARRAY),
        ];
        if !seen.is_empty() {
            params.push((&site_id, Type::TEXT));
            params.push((&last_seq, Type::INT8));
        }
        let inserted: i64 = match &mut self.prepared {
            // Parsed and planned once per connection and schema: for batches
            // of a row or two, planning was most of central's work.
            Some(prepared) => {
                let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
                let statement = crate::central::connect::prepared(&self.client, prepared, &sql, &types).await?;
                let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
                self.client.query_one(&statement, &values).await?.get(0)
            }
            // One unnamed statement: valid through a transaction pooler.
            None => self.client.query_typed_one(&sql, &params).await?.get(0),
        };
        let inserted = u64::try_from(inserted).unwrap_or(0);
        if let Some(known) = self.schemas.get_mut(schema).and_then(|s| s.partitions.as_mut()) {
            known.extend(new_buckets.iter().map(|(b, _)| *b));
        }
        Ok(inserted)
    }
}
