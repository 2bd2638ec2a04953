//! The device registry's commands: registration, revocation, and presence
//! (a device connecting or dropping).
//!
//! Guarantees: a refusal (the device exists, was revoked, is unknown) is
//! the request's answer and writes nothing; observers hear of a presence
//! change only once it committed.

use rusqlite::Connection;

use super::{Ctx, Reply, deliver};
use crate::event::now_us;
use crate::log::{Error, schema};

/// Records a device connecting or dropping.
pub(in crate::log) struct Presence {
    pub(in crate::log) tenant: String,
    pub(in crate::log) device_id: String,
    pub(in crate::log) online: bool,
    pub(in crate::log) reply: Reply<usize>,
}

impl Presence {
    pub(super) fn apply(self, tx: &Connection, cx: &mut Ctx<'_>) -> Result<(), Error> {
        let Presence { tenant, device_id, online, reply } = self;
        let r = schema::set_presence(tx, &tenant, &device_id, online, now_us());
        if r.is_ok() {
            cx.g.presence.push((tenant, device_id, online));
        }
        cx.g.delivers.push(deliver(reply, r));
        Ok(())
    }
}

/// Registers a device.
pub(in crate::log) struct AddDevice {
    pub(in crate::log) tenant: String,
    pub(in crate::log) device_id: String,
    pub(in crate::log) name: Option<String>,
    pub(in crate::log) role: schema::Role,
    /// A secret's argon2id hash and permissions, set in the same transaction.
    pub(in crate::log) secret: Option<(String, String)>,
    pub(in crate::log) reply: Reply<schema::Device>,
}

impl AddDevice {
    pub(super) fn apply(self, tx: &Connection, cx: &mut Ctx<'_>) -> Result<(), Error> {
        let now = now_us();
        let r = schema::add_device(tx, &self.tenant, &self.device_id, self.name.as_deref(), &self.role, now).and_then(
            |d| {
                if let Some((hash, perms)) = &self.secret {
                    schema::set_device_secret(tx, &self.tenant, &self.device_id, hash, perms, now)?;
                }
                Ok(d)
            },
        );
        cx.g.delivers.push(deliver(self.reply, r));
        Ok(())
    }
}

/// Revokes a device.
pub(in crate::log) struct RevokeDevice {
    pub(in crate::log) tenant: String,
    pub(in crate::log) device_id: String,
    pub(in crate::log) reply: Reply<schema::Device>,
}

impl RevokeDevice {
    pub(super) fn apply(self, tx: &Connection, cx: &mut Ctx<'_>) -> Result<(), Error> {
        let r = schema::revoke_device(tx, &self.tenant, &self.device_id, now_us());
        cx.g.delivers.push(deliver(self.reply, r));
        Ok(())
    }
}
