//! The device registry: registration, revocation, presence, and the
//! per-device counters the writer stores every `DEVICE_FLUSH`.
//!
//! Guarantees: a device id is registered once per tenant; a revoked id
//! stays revoked and cannot be registered again (its old tokens must never
//! work again); every change bumps `registry_version`, so other processes
//! notice it.

use rusqlite::{Connection, Row, params};
use serde::Serialize;

use super::super::Error;
use super::bump_registry_version;
use crate::event::from_us;

/// A device registry row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Device {
    pub tenant: String,
    pub device_id: String,
    pub name: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<time::OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen: Option<time::OffsetDateTime>,
    pub online: bool,
    pub event_count: i64,
    /// May publish for its children.
    pub gateway: bool,
    /// A child: the gateway it is registered under.
    pub via: Option<String>,
}

fn device(r: &Row<'_>) -> rusqlite::Result<Device> {
    Ok(Device {
        tenant: r.get(0)?,
        device_id: r.get(1)?,
        name: r.get(2)?,
        created_at: from_us(r.get(3)?),
        revoked_at: r.get::<_, Option<i64>>(4)?.map(from_us),
        last_seen: r.get::<_, Option<i64>>(5)?.map(from_us),
        online: r.get(6)?,
        event_count: r.get(7)?,
        gateway: r.get(8)?,
        via: r.get(9)?,
    })
}

/// Devices of one tenant, or of all tenants.
pub fn devices(conn: &Connection, tenant: Option<&str>) -> Result<Vec<Device>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT tenant, device_id, name, created_at, revoked_at, last_seen, online, event_count, gateway, via
         FROM devices WHERE ?1 IS NULL OR tenant = ?1 ORDER BY tenant, device_id",
    )?;
    let rows = stmt.query_map([tenant], device)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One device, if registered.
pub fn device_by_id(conn: &Connection, tenant: &str, device_id: &str) -> Result<Option<Device>, Error> {
    Ok(devices_matching(conn, tenant, device_id)?.into_iter().next())
}

fn devices_matching(conn: &Connection, tenant: &str, device_id: &str) -> Result<Vec<Device>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT tenant, device_id, name, created_at, revoked_at, last_seen, online, event_count, gateway, via
         FROM devices WHERE tenant = ?1 AND device_id = ?2",
    )?;
    let rows = stmt.query_map([tenant, device_id], device)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Devices online now, with last seen.
pub fn online_devices(conn: &Connection, tenant: &str) -> Result<Vec<Device>, Error> {
    Ok(devices(conn, Some(tenant))?.into_iter().filter(|d| d.online).collect())
}

/// How a device is registered besides its id: a gateway, or a child of one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Role {
    /// May publish for its children.
    pub gateway: bool,
    /// A child of this gateway (registered, not revoked, same tenant).
    pub via: Option<String>,
}

/// Registers a device. A revoked id stays revoked; a child's gateway must
/// be a registered, unrevoked gateway of the tenant.
pub fn add_device(
    conn: &Connection,
    tenant: &str,
    device_id: &str,
    name: Option<&str>,
    role: &Role,
    now_us: i64,
) -> Result<Device, Error> {
    if let Some(d) = device_by_id(conn, tenant, device_id)? {
        return Err(if d.revoked_at.is_some() {
            Error::DeviceRevoked { tenant: tenant.into(), device_id: device_id.into() }
        } else {
            Error::DeviceExists { tenant: tenant.into(), device_id: device_id.into() }
        });
    }
    if let Some(gw) = &role.via {
        match device_by_id(conn, tenant, gw)? {
            Some(g) if g.gateway && g.revoked_at.is_none() => {}
            _ => return Err(Error::NotAGateway { tenant: tenant.into(), device_id: gw.clone() }),
        }
    }
    conn.execute(
        "INSERT INTO devices (tenant, device_id, name, created_at, gateway, via) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![tenant, device_id, name, now_us, role.gateway, role.via],
    )?;
    bump_registry_version(conn)?;
    device_by_id(conn, tenant, device_id)?
        .ok_or_else(|| Error::DeviceNotFound { tenant: tenant.into(), device_id: device_id.into() })
}

/// What a gateway's publish for another device id finds (see
/// [`child_status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Child {
    /// Registered under this gateway, not revoked.
    Registered,
    /// Not registered: the gateway's first event for it registers it
    /// (within `mqtt.gateway_max_children`).
    Unknown,
    /// The publish is refused: why.
    Refused(String),
}

/// Whether `gateway` may publish for `child`, given the child's
/// registration (`found`: revoked, and the gateway it is registered under;
/// `None`: not registered). The one rule for the session's check (from
/// the registry's cache) and the event's own transaction.
pub fn child_status(tenant: &str, gateway: &str, child: &str, found: Option<(bool, Option<&str>)>) -> Child {
    match found {
        None => Child::Unknown,
        Some((true, _)) => Child::Refused(format!("device {tenant}/{child} is revoked")),
        Some((false, via)) if via == Some(gateway) => Child::Registered,
        Some(_) => Child::Refused(format!("device {tenant}/{child} is not a child of gateway {gateway:?}")),
    }
}

/// A child a gateway publishes for, registered under it with its first
/// event when it is not registered yet and the gateway has fewer than
/// `max_children`; `Err` (the event is refused) when the id is another
/// device's, revoked, or over the limit.
pub(crate) fn child_for_event(
    conn: &Connection,
    tenant: &str,
    gateway: &str,
    child: &str,
    max_children: usize,
    now_us: i64,
) -> Result<(), Error> {
    let found = device_by_id(conn, tenant, child)?;
    let found = found.as_ref().map(|d| (d.revoked_at.is_some(), d.via.as_deref()));
    match child_status(tenant, gateway, child, found) {
        Child::Registered => Ok(()),
        Child::Refused(why) => Err(Error::ChildRefused { why, quota: false }),
        Child::Unknown => {
            let n: i64 = conn
                .prepare_cached("SELECT count(*) FROM devices WHERE tenant = ?1 AND via = ?2")?
                .query_row(params![tenant, gateway], |r| r.get(0))?;
            if n as usize >= max_children {
                let why = format!(
                    "gateway {gateway:?} has {n} children, mqtt.gateway_max_children = {max_children}: {child:?} not registered"
                );
                return Err(Error::ChildRefused { why, quota: true });
            }
            let role = Role { gateway: false, via: Some(gateway.to_string()) };
            add_device(conn, tenant, child, None, &role, now_us).map(|_| ())
        }
    }
}

/// Sets (or replaces) the secret of a registered, unrevoked device: `hash`
/// is its argon2id PHC string, `perms` what a login with it may do
/// (comma-separated).
pub fn set_device_secret(
    conn: &Connection,
    tenant: &str,
    device_id: &str,
    hash: &str,
    perms: &str,
    now_us: i64,
) -> Result<(), Error> {
    match device_by_id(conn, tenant, device_id)? {
        None => return Err(Error::DeviceNotFound { tenant: tenant.into(), device_id: device_id.into() }),
        Some(d) if d.revoked_at.is_some() => {
            return Err(Error::DeviceRevoked { tenant: tenant.into(), device_id: device_id.into() });
        }
        Some(_) => {}
    }
    conn.execute(
        "INSERT INTO device_secrets (tenant, device_id, hash, perms, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (tenant, device_id) DO UPDATE SET hash = excluded.hash, perms = excluded.perms,
           created_at = excluded.created_at",
        params![tenant, device_id, hash, perms, now_us],
    )?;
    Ok(())
}

/// A device's secret: its tenant, hash and permissions. `tenant` `None`
/// finds the device id in whichever tenant has it, if only one does.
pub fn device_secret(
    conn: &Connection,
    tenant: Option<&str>,
    device_id: &str,
) -> Result<Option<(String, String, String)>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT tenant, hash, perms FROM device_secrets WHERE device_id = ?1 AND (?2 IS NULL OR tenant = ?2) LIMIT 2",
    )?;
    let rows: Vec<(String, String, String)> = stmt
        .query_map(params![device_id, tenant], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    Ok(match <[_; 1]>::try_from(rows) {
        Ok([one]) => Some(one),
        Err(_) => None,
    })
}

/// Revokes a device: every token it holds stops working.
pub fn revoke_device(conn: &Connection, tenant: &str, device_id: &str, now_us: i64) -> Result<Device, Error> {
    let n = conn.execute(
        "UPDATE devices SET revoked_at = coalesce(revoked_at, ?3), online = 0 WHERE tenant = ?1 AND device_id = ?2",
        params![tenant, device_id, now_us],
    )?;
    if n == 0 {
        return Err(Error::DeviceNotFound { tenant: tenant.into(), device_id: device_id.into() });
    }
    bump_registry_version(conn)?;
    device_by_id(conn, tenant, device_id)?
        .ok_or_else(|| Error::DeviceNotFound { tenant: tenant.into(), device_id: device_id.into() })
}

/// Marks a device online or offline and refreshes its last-seen time.
pub(crate) fn set_presence(
    conn: &Connection,
    tenant: &str,
    device_id: &str,
    online: bool,
    now_us: i64,
) -> Result<usize, Error> {
    let mut stmt = conn.prepare_cached(
        "UPDATE devices SET online = ?3, last_seen = max(coalesce(last_seen, 0), ?4) WHERE tenant = ?1 AND device_id = ?2",
    )?;
    Ok(stmt.execute(params![tenant, device_id, online, now_us])?)
}

/// Adds `count` events and a last-seen time to a device's counters.
pub(crate) fn bump_device(
    conn: &Connection,
    tenant: &str,
    device_id: &str,
    count: i64,
    seen_us: i64,
) -> Result<(), Error> {
    let mut stmt = conn.prepare_cached(
        "UPDATE devices SET event_count = event_count + ?3, last_seen = max(coalesce(last_seen, 0), ?4)
         WHERE tenant = ?1 AND device_id = ?2",
    )?;
    stmt.execute(params![tenant, device_id, count, seen_us])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::registry_version;
    use super::super::testing::log;
    use super::*;

    #[test]
    fn a_device_is_added_once_and_a_revoked_id_is_never_reused() {
        let c = log();
        let v0 = registry_version(&c).unwrap();
        let d = add_device(&c, "acme", "d1", Some("pump"), &Role::default(), 5).unwrap();
        assert_eq!((d.name.as_deref(), d.revoked_at, d.event_count), (Some("pump"), None, 0));
        assert!(matches!(add_device(&c, "acme", "d1", None, &Role::default(), 6), Err(Error::DeviceExists { .. })));
        assert!(add_device(&c, "globex", "d1", None, &Role::default(), 6).is_ok(), "ids are per tenant");
        let revoked = revoke_device(&c, "acme", "d1", 7).unwrap();
        assert_eq!(revoked.revoked_at, Some(from_us(7)));
        assert!(matches!(add_device(&c, "acme", "d1", None, &Role::default(), 8), Err(Error::DeviceRevoked { .. })));
        assert!(matches!(revoke_device(&c, "acme", "nope", 8), Err(Error::DeviceNotFound { .. })));
        assert_eq!(registry_version(&c).unwrap(), v0 + 3, "every change is seen by other processes");
    }

    #[test]
    fn counters_and_presence_keep_the_latest_time() {
        let c = log();
        add_device(&c, "acme", "d1", None, &Role::default(), 0).unwrap();
        bump_device(&c, "acme", "d1", 3, 2_000_000).unwrap();
        bump_device(&c, "acme", "d1", 2, 1_000_000).unwrap();
        set_presence(&c, "acme", "d1", true, 1_500_000).unwrap();
        let d = device_by_id(&c, "acme", "d1").unwrap().unwrap();
        assert_eq!((d.event_count, d.last_seen, d.online), (5, Some(from_us(2_000_000)), true));
        assert_eq!(online_devices(&c, "acme").unwrap().len(), 1);
        assert_eq!(set_presence(&c, "acme", "unknown", true, 0).unwrap(), 0);
    }

    /// A gateway's event for a child: a child of it passes, a new id is
    /// registered under it within the bound, and another device, a revoked
    /// child or one over the bound is refused (nothing registered).
    #[test]
    fn a_gateway_registers_children_within_its_bound_and_no_one_else() {
        let c = log();
        let gw = Role { gateway: true, via: None };
        add_device(&c, "acme", "gw", None, &gw, 0).unwrap();
        add_device(&c, "acme", "plain", None, &Role::default(), 0).unwrap();
        let child = Role { gateway: false, via: Some("gw".into()) };
        add_device(&c, "acme", "lamp", None, &child, 0).unwrap();
        let refused = |r: Result<(), Error>| match r {
            Err(Error::ChildRefused { why, quota }) => (why, quota),
            other => panic!("{other:?}"),
        };
        child_for_event(&c, "acme", "gw", "lamp", 2, 1).unwrap();
        child_for_event(&c, "acme", "gw", "plug", 2, 1).unwrap();
        assert_eq!(device_by_id(&c, "acme", "plug").unwrap().unwrap().via.as_deref(), Some("gw"));
        let (why, quota) = refused(child_for_event(&c, "acme", "gw", "extra", 2, 1));
        assert!(quota && why.contains("gateway_max_children = 2"), "{why}");
        assert!(device_by_id(&c, "acme", "extra").unwrap().is_none());
        let (why, quota) = refused(child_for_event(&c, "acme", "gw", "plain", 9, 1));
        assert!(!quota && why.contains("not a child"), "{why}");
        revoke_device(&c, "acme", "lamp", 2).unwrap();
        let (why, _) = refused(child_for_event(&c, "acme", "gw", "lamp", 9, 3));
        assert!(why.contains("revoked"), "{why}");
        // A child's gateway must be one.
        let bad = Role { gateway: false, via: Some("plain".into()) };
        assert!(matches!(add_device(&c, "acme", "x", None, &bad, 0), Err(Error::NotAGateway { .. })));
    }
}
