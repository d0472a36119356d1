//! Looking after a cache directory from the outside: what it holds, which mounts use it,
//! setting its bound, trimming it and emptying it safely (`cdpfs cache info|init|trim|clear`).
//!
//! Every mount that uses a cache directory registers itself in `mounts/<host>-<pid>` (holding its
//! mount point) for as long as it runs; `clear` refuses while a registered mount is alive.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::bound::{self, hostname};

/// What a cache directory holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Cached data blocks.
    pub blocks: u64,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Distinct object versions with at least one block.
    pub objects: u64,
    /// Saved directory listings.
    pub listings: u64,
}

/// Counts what `dir` holds.
pub fn usage(dir: &Path) -> Usage {
    let mut usage = Usage::default();
    let mut objects = std::collections::HashSet::new();
    for shard in fs::read_dir(dir.join("blocks")).into_iter().flatten().flatten() {
        for file in fs::read_dir(shard.path()).into_iter().flatten().flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // a block being written
            }
            usage.blocks += 1;
            usage.bytes += file.metadata().map_or(0, |m| m.len());
            objects.insert(name.split('-').next().unwrap_or_default().to_owned());
        }
    }
    usage.objects = objects.len() as u64;
    usage.listings = fs::read_dir(dir.join("listings")).into_iter().flatten().count() as u64;
    usage
}

/// A mount's registration in a cache directory; removed when dropped.
#[derive(Debug)]
pub struct Registration {
    path: PathBuf,
}

impl Registration {
    /// Registers this process, serving `mountpoint`, as a user of `dir`.
    pub fn new(dir: &Path, mountpoint: &Path) -> std::io::Result<Registration> {
        let mounts = dir.join("mounts");
        fs::create_dir_all(&mounts)?;
        let path = mounts.join(format!("{}-{}", hostname(), std::process::id()));
        fs::write(&path, mountpoint.to_string_lossy().as_bytes())?;
        Ok(Registration { path })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Mount points of live mounts registered in `dir` (stale entries of this host are removed).
pub fn live_mounts(dir: &Path) -> Vec<String> {
    let host = hostname();
    let mut live = Vec::new();
    for entry in fs::read_dir(dir.join("mounts")).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((entry_host, pid)) = name.rsplit_once('-') else { continue };
        let mountpoint = fs::read_to_string(entry.path()).unwrap_or_default();
        if entry_host == host
            && !(Path::new(&format!("/proc/{pid}")).exists()
                && crate::mount_table::mount_type(Path::new(&mountpoint)).ok().flatten().is_some())
        {
            // Its process is gone, or it is shutting down after its unmount.
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_file(entry.path());
            }
            continue;
        }
        live.push(if entry_host == host { mountpoint } else { format!("{mountpoint} on {entry_host}") });
    }
    live
}

/// Fails unless `dir` is a cache directory (one a mount, a prefetch or `cdpfs cache init` made).
pub fn check(dir: &Path) -> Result<()> {
    if !dir.join("blocks").is_dir() {
        bail!("{} is not a cdpfs cache directory", dir.display());
    }
    Ok(())
}

/// One eviction pass over `dir` now (`cdpfs cache trim`): evicts the least recently used blocks
/// when they are near the directory's bound, removes temp files left by writers that died and
/// refreshes the usage summary. Fails when another process is evicting at the moment.
pub fn trim(dir: &Path) -> Result<bound::Pass> {
    check(dir)?;
    let space = bound::Space::open(dir, None, false);
    match space.pass(false).with_context(|| format!("trimming {}", dir.display()))? {
        Some(pass) => Ok(pass),
        None => bail!("another process is evicting from {} right now; try again later", dir.display()),
    }
}

/// Empties `dir` unless a live mount uses it; returns what was removed.
pub fn clear(dir: &Path) -> Result<Usage> {
    check(dir)?;
    let users = live_mounts(dir);
    if !users.is_empty() {
        bail!("{} is in use by the mount(s) {}; unmount first", dir.display(), users.join(", "));
    }
    let before = usage(dir);
    let _ = fs::remove_file(dir.join("usage"));
    // `portal`: the portal API's answers (ids, facet folders).
    for sub in ["blocks", "listings", "tmp", "portal"] {
        let path = dir.join(sub);
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        fs::create_dir_all(&path)?;
    }
    Ok(before)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_refuses_while_registered_and_empties_after() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("blocks/ab")).unwrap();
        fs::write(dir.path().join("blocks/ab/ab00000000000000-0"), vec![0u8; 100]).unwrap();
        fs::write(dir.path().join("blocks/ab/ab00000000000000-1"), vec![0u8; 50]).unwrap();
        fs::create_dir_all(dir.path().join("listings")).unwrap();
        fs::write(dir.path().join("listings/x.json"), b"{}").unwrap();
        assert_eq!(usage(dir.path()), Usage { blocks: 2, bytes: 150, objects: 1, listings: 1 });
        // "/" is always mounted: a live registration.
        let registration = Registration::new(dir.path(), Path::new("/")).unwrap();
        let refused = clear(dir.path()).unwrap_err().to_string();
        assert!(refused.contains("in use by the mount(s) /;"), "{refused}");
        drop(registration);
        let unmounted = Registration::new(dir.path(), Path::new("/no/such/mount")).unwrap();
        assert!(live_mounts(dir.path()).is_empty(), "a registration whose mount is gone counts as live");
        drop(unmounted);
        assert_eq!(clear(dir.path()).unwrap().blocks, 2);
        assert_eq!(usage(dir.path()), Usage::default());
    }

    #[test]
    fn registrations_of_dead_processes_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("mounts")).unwrap();
        fs::create_dir_all(dir.path().join("blocks")).unwrap();
        fs::write(dir.path().join(format!("mounts/{}-4194304999", hostname())), b"/mnt/gone").unwrap();
        assert!(live_mounts(dir.path()).is_empty());
        assert!(clear(dir.path()).is_ok());
    }
}
