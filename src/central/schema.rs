//! Central schema migrations, one schema per tenant (`tenant_<t>`), versioned
//! in `tenant_<t>.outpost_migrations` and serialized by a per-tenant advisory
//! lock so many sites can migrate at once. The tenant name is validated
//! before it is ever put into SQL.

use tokio_postgres::Client;

use super::Error;
use crate::config::NotifyMode;
use crate::event::Tenant;

/// Versioned migrations, applied in order.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_tenant_events.sql")),
    (2, include_str!("../../migrations/postgres/0002_event_properties.sql")),
];

/// `tenant_<t>`, after checking `t`.
pub fn schema_name(tenant: &str) -> Result<String, Error> {
    let tenant = Tenant::parse(tenant).map_err(|_| Error::BadTenant(tenant.to_string()))?;
    Ok(format!("tenant_{tenant}"))
}

/// The NOTIFY channel of a tenant: `tenant_<t>_events`.
pub fn channel_name(tenant: &str) -> Result<String, Error> {
    Ok(format!("{}_events", schema_name(tenant)?))
}

/// Brings one tenant's schema up to date and installs the NOTIFY trigger of
/// `notify` (replacing the other one). Returns how many migrations ran.
pub async fn migrate_tenant(client: &mut Client, tenant: &str, notify: NotifyMode) -> Result<usize, Error> {
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
    let (want, other, ddl) = match notify {
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
    Ok(applied)
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
