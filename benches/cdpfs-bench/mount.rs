//! A cdpfs mount of the origin for one case (the `cdpfs` binary, unmounted on drop), its cache
//! directory, and what the serving cdpfs process costs: CPU time and peak resident memory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::fixture::BUCKET;

/// An empty cache directory on the same disk as the origin's files; deleted on drop.
pub fn cache_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("cdpfs-bench-cache-").tempdir().unwrap()
}

/// A mount; unmounted on drop.
pub struct Mount {
    path: PathBuf,
}

impl Mount {
    /// Mounts `endpoint` with `cache_dir` and the `extra` options of `cdpfs mount`.
    pub fn new(endpoint: &str, cache_dir: &Path, extra: &[&str]) -> Mount {
        let path = std::env::temp_dir().join(format!("cdpfs-bench-mnt-{}", std::process::id()));
        fs::create_dir_all(&path).unwrap();
        let status = Command::new(env!("CARGO_BIN_EXE_cdpfs"))
            .args(["mount", path.to_str().unwrap(), "--endpoint-url", endpoint, "--bucket", BUCKET])
            .args(["--cache-dir", cache_dir.to_str().unwrap()])
            .args(extra)
            .status()
            .unwrap();
        assert!(status.success(), "mount failed");
        Mount { path }
    }

    pub fn file(&self, key: &str) -> PathBuf {
        self.path.join(key)
    }

    /// The /proc directory of the cdpfs process serving this mount.
    fn process(&self) -> PathBuf {
        let wanted = self.path.to_str().unwrap().as_bytes().to_vec();
        fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .map(|p| p.path())
            .find(|p| fs::read(p.join("cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == wanted)))
            .expect("no cdpfs process serves the mount")
    }

    /// Peak resident memory of the cdpfs process serving this mount, in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = fs::read_to_string(self.process().join("status")).unwrap_or_default();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in status");
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    /// CPU time (user + system) the cdpfs process has used so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = fs::read_to_string(self.process().join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / clock_ticks_per_second()
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_cdpfs")).args(["unmount", self.path.to_str().unwrap()]).status();
        std::thread::sleep(Duration::from_millis(200));
        let _ = fs::remove_dir(&self.path);
    }
}
