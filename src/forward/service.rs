//! Writes one tenant's batch to the central database in one transaction:
//! COPY BINARY into a temporary stage, then `INSERT … SELECT … ON CONFLICT
//! DO NOTHING`, so a resend never duplicates (the key is `id`, or
//! `(id, "timestamp")` on a partitioned table: a resend carries both).
//! Before the insert, the time partitions the batch needs are made sure of,
//! once per partition and connection.

use std::error::Error as StdError;

use bytes::{BufMut, BytesMut};
use futures_util::pin_mut;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
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
    Ok(client.query_one(sql, &[&format!("{schema}.events")]).await?.get(0))
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
    /// Opens a connection and its staging table.
    pub async fn open(connector: &Connector) -> Result<Self, Error> {
        let (client, task) = connector.connect().await?;
        let central = Central {
            client,
            task,
            interval: connector.partition_interval,
            window: connector.partition_window,
            schemas: Default::default(),
        };
        central
            .client
            .batch_execute(
                "CREATE TEMP TABLE IF NOT EXISTS outpost_stage (
                    id uuid, device_id text, event_type text, payload jsonb, ts timestamptz,
                    site_id text, site_seq bigint, received_at timestamptz, properties jsonb
                 ) ON COMMIT DELETE ROWS",
            )
            .await?;
        Ok(central)
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
        let exists: bool =
            self.client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&format!("{schema}.sites")]).await?.get(0);
        if !exists {
            return Ok(None);
        }
        let sql = format!("SELECT coalesce(max(last_seq), 0) FROM {schema}.sites WHERE site_id = $1");
        Ok(Some(self.client.query_one(&sql, &[&site]).await?.get(0)))
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
                .query_one(
                    "SELECT to_regclass($1) IS NOT NULL, to_regprocedure($2) IS NOT NULL",
                    &[
                        &format!("{schema}.sites"),
                        &format!("{schema}.outpost_ensure_partition(timestamptz,interval,text)"),
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
                self.client.query_one(&ensure, &[at]).await?;
            }
            let count = count_partitions(&self.client, schema).await?;
            if let Some(found) = self.schemas.get_mut(schema) {
                found.partition_count = count;
            }
        }
        let tx = self.client.transaction().await?;
        let sink = tx
            .copy_in(
                "COPY outpost_stage (id, device_id, event_type, payload, ts, site_id, site_seq, received_at, properties) \
                 FROM STDIN BINARY",
            )
            .await?;
        let types = [
            Type::UUID,
            Type::TEXT,
            Type::TEXT,
            Type::JSONB,
            Type::TIMESTAMPTZ,
            Type::TEXT,
            Type::INT8,
            Type::TIMESTAMPTZ,
            Type::JSONB,
        ];
        let writer = BinaryCopyInWriter::new(sink, &types);
        pin_mut!(writer);
        for r in rows {
            let payload = JsonText(r.payload.get());
            let properties = r.properties.as_ref().map(|p| JsonText(p.get()));
            writer
                .as_mut()
                .write(&[
                    &r.id,
                    &r.device_id,
                    &r.event_type,
                    &payload,
                    &r.timestamp,
                    &r.origin_site,
                    &r.seq,
                    &r.received_at,
                    &properties,
                ])
                .await?;
        }
        writer.finish().await?;
        let insert = format!(
            "INSERT INTO {schema}.events (id, device_id, event_type, payload, \"timestamp\", site_id, site_seq, received_at, properties)
             SELECT id, device_id, event_type, payload, ts, site_id, site_seq, received_at, properties
             FROM outpost_stage ORDER BY site_seq
             ON CONFLICT DO NOTHING"
        );
        // The site's row in `sites` (when the schema has it), pipelined with
        // the insert: no extra round trip on a slow uplink.
        let site = rows.iter().max_by_key(|r| r.seq).map(|r| (r.origin_site.as_str(), r.seq));
        let upsert = format!(
            "INSERT INTO {schema}.sites (site_id, last_seen, last_seq) VALUES ($1, now(), $2)
             ON CONFLICT (site_id) DO UPDATE SET last_seen = now(), last_seq = greatest({schema}.sites.last_seq, excluded.last_seq)"
        );
        let seen = async {
            match site {
                Some((id, seq)) if has_sites => tx.execute(&upsert, &[&id, &seq]).await.map(|_| ()),
                _ => Ok(()),
            }
        };
        let (inserted, ()) = futures_util::try_join!(tx.execute(&insert, &[]), seen)?;
        tx.commit().await?;
        if let Some(known) = self.schemas.get_mut(schema).and_then(|s| s.partitions.as_mut()) {
            known.extend(new_buckets.iter().map(|(b, _)| *b));
        }
        Ok(inserted)
    }
}
