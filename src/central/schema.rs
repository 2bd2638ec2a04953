//! Central schema migrations, one schema per tenant (`tenant_<t>`), versioned
//! in `tenant_<t>.outpost_migrations` and serialized by a per-tenant advisory
//! lock so many sites can migrate at once. The tenant name is validated
//! before it is ever put into SQL.
//!
//! `events` is partitioned by range of `"timestamp"` (central.partition_interval):
//! a new tenant's empty table is converted at once; a table that already
//! holds rows is left as it is, with a warning, until
//! `outpost migrate --central --partition-existing` copies it over.

use tokio_postgres::Client;

use super::Error;
use crate::config::{NotifyMode, PartitionInterval};
use crate::event::Tenant;

/// Versioned migrations, applied in order.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_tenant_events.sql")),
    (2, include_str!("../../migrations/postgres/0002_event_properties.sql")),
    (3, include_str!("../../migrations/postgres/0003_partitions.sql")),
    (4, include_str!("../../migrations/postgres/0004_sites.sql")),
    (5, include_str!("../../migrations/postgres/0005_notify_batch_one_query.sql")),
];

/// Converts an unpartitioned `events` into a partitioned one, keeping its rows.
const PARTITION_EXISTING: &str = include_str!("../../migrations/postgres/partition_existing.sql");

/// How the central schema of one tenant should look.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub notify: NotifyMode,
    pub interval: PartitionInterval,
    /// Also convert an `events` table that already holds rows (copies them).
    pub partition_existing: bool,
    /// Drop partitions whose events are all older than this (`central.retention`).
    pub retention: Option<std::time::Duration>,
}

impl Layout {
    pub fn of(config: &crate::config::CentralConfig) -> Self {
        Layout {
            notify: config.notify,
            interval: config.partition_interval,
            partition_existing: false,
            retention: config.retention,
        }
    }
}

/// What [`migrate_tenant`] did and found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// Versioned migrations applied.
    pub applied: usize,
    /// `events` is partitioned by time (after this call).
    pub partitioned: bool,
    /// `events` was converted to a partitioned table by this call.
    pub converted: bool,
    /// Partitions dropped as past `retention`.
    pub dropped: i32,
}

/// `tenant_<t>`, after checking `t`.
pub fn schema_name(tenant: &str) -> Result<String, Error> {
    let tenant = Tenant::parse(tenant).map_err(|_| Error::BadTenant(tenant.to_string()))?;
    Ok(format!("tenant_{tenant}"))
}

/// The NOTIFY channel of a tenant: `tenant_<t>_events`.
pub fn channel_name(tenant: &str) -> Result<String, Error> {
    Ok(format!("{}_events", schema_name(tenant)?))
}

/// Brings one tenant's schema up to date: versioned migrations, then time
/// partitions (converting an empty or, with `partition_existing`, any
/// unpartitioned `events`; creating the current and next partition;
/// dropping those past `retention`), then the NOTIFY trigger of `notify`
/// (replacing the other one).
pub async fn migrate_tenant(client: &mut Client, tenant: &str, layout: Layout) -> Result<Migrated, Error> {
    let schema = schema_name(tenant)?;
    let channel = channel_name(tenant)?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&format!("outpost:migrate:{schema}")]).await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.outpost_migrations (
             version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    ))
    .await?;
    let current: i32 =
        tx.query_one(&format!("SELECT coalesce(max(version), 0) FROM {schema}.outpost_migrations"), &[]).await?.get(0);
    let mut applied = 0;
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(&sql.replace("{{schema}}", &schema).replace("{{channel}}", &channel)).await?;
        tx.execute(&format!("INSERT INTO {schema}.outpost_migrations (version) VALUES ($1)"), &[version]).await?;
        applied += 1;
    }
    let mut converted = false;
    if !is_partitioned(&tx, &schema).await? {
        // Writers wait (readers do not) until this transaction ends: no
        // insert may land between the emptiness check or the copy and the
        // swap, or it would be lost with the old table.
        tx.batch_execute(&format!("LOCK TABLE {schema}.events IN EXCLUSIVE MODE")).await?;
        let empty = tx.query_one(&format!("SELECT NOT EXISTS (SELECT 1 FROM {schema}.events)"), &[]).await?.get(0);
        if empty || layout.partition_existing {
            tx.batch_execute(
                &PARTITION_EXISTING.replace("{{schema}}", &schema).replace("{{step}}", &layout.interval.sql()),
            )
            .await?;
            converted = true;
        }
    }
    let partitioned = is_partitioned(&tx, &schema).await?;
    if partitioned {
        let step = layout.interval.sql();
        tx.batch_execute(&format!(
            "SELECT {schema}.outpost_ensure_partition(now(), {step}::interval);
             SELECT {schema}.outpost_ensure_partition(now() + {step}::interval, {step}::interval)"
        ))
        .await?;
    }
    let mut dropped = 0;
    if let (true, Some(retention)) = (partitioned, layout.retention) {
        let before = std::time::SystemTime::now() - retention;
        dropped = tx.query_one(&format!("SELECT {schema}.outpost_drop_partitions($1)"), &[&before]).await?.get(0);
    }
    let (want, other, ddl) = match layout.notify {
        NotifyMode::PerRow => (
            "events_notify_row",
            "events_notify_batch",
            format!(
                "CREATE TRIGGER events_notify_row AFTER INSERT ON {schema}.events
                 FOR EACH ROW EXECUTE FUNCTION {schema}.notify_event_row()"
            ),
        ),
        NotifyMode::PerBatch => (
            "events_notify_batch",
            "events_notify_row",
            format!(
                "CREATE TRIGGER events_notify_batch AFTER INSERT ON {schema}.events
                 REFERENCING NEW TABLE AS new_rows
                 FOR EACH STATEMENT EXECUTE FUNCTION {schema}.notify_event_batch()"
            ),
        ),
    };
    let exists = |name: &'static str| {
        let tx = &tx;
        let schema = schema.clone();
        async move {
            tx.query_opt(
                "SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = 'events' AND t.tgname = $2",
                &[&schema, &name],
            )
            .await
            .map(|r| r.is_some())
        }
    };
    // Only touch triggers when the mode changes: DDL locks the table.
    if exists(other).await? {
        tx.batch_execute(&format!("DROP TRIGGER {other} ON {schema}.events")).await?;
    }
    if !exists(want).await? {
        tx.batch_execute(&ddl).await?;
    }
    tx.commit().await?;
    Ok(Migrated { applied, partitioned, converted, dropped })
}

async fn is_partitioned(tx: &tokio_postgres::Transaction<'_>, schema: &str) -> Result<bool, Error> {
    let row = tx
        .query_one(
            "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = 'events'",
            &[&schema],
        )
        .await?;
    Ok(row.get::<_, String>(0) == "p")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_built_only_from_valid_tenants() {
        assert_eq!(schema_name("acme").unwrap(), "tenant_acme");
        assert_eq!(channel_name("acme").unwrap(), "tenant_acme_events");
        assert!(schema_name("acme; drop table x").is_err());
        assert!(schema_name("Acme").is_err());
    }
}
