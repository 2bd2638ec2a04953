//! What the operating system says about the box: free space of a
//! filesystem and the bytes this process made the kernel write to storage.
//! Used by `outpost doctor` and the status page.

use std::path::Path;

/// Space of the filesystem holding `path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    /// Bytes an unprivileged process may still use.
    pub available: u64,
    pub total: u64,
}

/// `statvfs(path)`; `None` if the call fails.
pub fn fs_space(path: &Path) -> Option<FsSpace> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid
    // NUL-terminated path for the duration of the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    #[allow(clippy::useless_conversion)] // the field widths differ between targets
    let frsize = u64::from(st.f_frsize);
    #[allow(clippy::useless_conversion)]
    Some(FsSpace {
        available: u64::from(st.f_bavail).saturating_mul(frsize),
        total: u64::from(st.f_blocks).saturating_mul(frsize),
    })
}

/// `write_bytes` of `/proc/self/io`: bytes this process caused to be sent
/// to storage. `None` where the kernel does not offer it (no task I/O
/// accounting, or no /proc).
pub fn process_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    parse_write_bytes(&io)
}

fn parse_write_bytes(io: &str) -> Option<u64> {
    io.lines().find_map(|l| l.strip_prefix("write_bytes:")).and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_bytes_is_read_from_proc_io_text() {
        let io = "rchar: 1\nwchar: 2\nread_bytes: 3\nwrite_bytes: 4096\ncancelled_write_bytes: 0\n";
        assert_eq!(parse_write_bytes(io), Some(4096));
        assert_eq!(parse_write_bytes("rchar: 1\n"), None);
    }

    #[test]
    fn statvfs_of_the_temp_dir_reports_space() {
        let s = fs_space(&std::env::temp_dir()).unwrap();
        assert!(s.total > 0 && s.available <= s.total);
    }
}
