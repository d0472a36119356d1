//! The kernel's mount table, as this process sees it (`/proc/self/mountinfo`).

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

/// The filesystem type mounted exactly at `path`, if something is.
pub fn mount_type(path: &Path) -> Result<Option<String>> {
    let table = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let wanted = path.to_string_lossy();
    // Fields: id parent dev root mountpoint options [optional...] - fstype source superoptions
    Ok(table.lines().rev().find_map(|line| {
        let mut fields = line.split(' ');
        let mountpoint = unescape_mountinfo(fields.nth(4)?);
        if mountpoint != wanted {
            return None;
        }
        let after_separator = line.split(" - ").nth(1)?;
        Some(after_separator.split(' ').next()?.to_owned())
    }))
}

/// Mount points of every mount of filesystem type `fstype` (e.g. `fuse.cdpfs`).
pub fn mounts_of_type(fstype: &str) -> Result<Vec<std::path::PathBuf>> {
    let table = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(table
        .lines()
        .filter(|line| line.split(" - ").nth(1).and_then(|rest| rest.split(' ').next()) == Some(fstype))
        .filter_map(|line| line.split(' ').nth(4).map(|m| unescape_mountinfo(m).into()))
        .collect())
}

/// Whether `path`, which need not exist, is at or under the mount point of a cdpfs mount (its
/// nearest existing folder, links resolved, as the mount table names mount points).
pub fn under_a_cdpfs_mount(path: &Path) -> Result<bool> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let Some(existing) = absolute.ancestors().find_map(|folder| fs::canonicalize(folder).ok()) else {
        return Ok(false);
    };
    Ok(mounts_of_type("fuse.cdpfs")?.iter().any(|m| existing.starts_with(m)))
}

/// Decodes the octal escapes (`\040` for space, ...) the kernel uses in mountinfo paths.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/mnt/with\\040space"), "/mnt/with space");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/tab\\011x\\134y"), "/tab\tx\\y");
        assert_eq!(unescape_mountinfo("/short\\04"), "/short\\04");
    }
}
