//! Staging files into the cache (`cdpfs prefetch PATH...`): reads files of a cdpfs mount in
//! parallel, so the mount's block cache (memory and disk) holds them before a job needs them.
//! Files already fully cached are skipped; a terminal gets a progress bar with bytes, rate and
//! ETA, anything else one line per file. Folders stage the bucket's objects; MRC views are
//! staged only when named.

use std::ffi::CString;
use std::fs::File;
use std::io::{IsTerminal, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

/// Reads every file under `paths` (files or folders of a cdpfs mount) with `jobs` readers.
pub fn prefetch(paths: &[PathBuf], jobs: usize) -> Result<()> {
    let mut files = Vec::new();
    for path in paths {
        collect(path, &mut files)?;
    }
    let mut pending = Vec::new();
    let mut skipped = 0;
    for (path, size) in files {
        let cached: u64 = xattr(&path, "user.cdpfs.cached")
            .with_context(|| format!("{} is not on a cdpfs mount", path.display()))?
            .parse()
            .unwrap_or(0);
        if cached >= size {
            skipped += 1;
        } else {
            pending.push((path, size));
        }
    }
    let total: u64 = pending.iter().map(|(_, size)| size).sum();
    let terminal = std::io::stderr().is_terminal();
    let bar = if terminal { ProgressBar::new(total) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}")
            .expect("valid progress template"),
    );
    let count = pending.len();
    let queue = Mutex::new(pending);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| loop {
                let Some((path, size)) = queue.lock().expect("queue poisoned").pop() else { return };
                match read_through(&path, &bar) {
                    Ok(()) if !terminal => println!("prefetched {} ({size} bytes)", path.display()),
                    Ok(()) => {}
                    Err(e) => failures.lock().expect("failures poisoned").push(format!("{}: {e}", path.display())),
                }
            });
        }
    });
    bar.finish_and_clear();
    let failures = failures.into_inner().expect("failures poisoned");
    println!(
        "prefetched {} files ({total} bytes), {skipped} already cached, {} failed",
        count - failures.len(),
        failures.len()
    );
    if !failures.is_empty() {
        bail!("could not fetch:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// Every regular file under `path`, with its size.
fn collect(path: &Path, out: &mut Vec<(PathBuf, u64)>) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot prefetch {}", path.display()))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("listing {}", path.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        entries.sort();
        for entry in entries {
            // A folder stages its objects, not the MRC views computed from them (a view's key
            // is its Zarr level's folder); name a view to stage it.
            if entry.is_file() && xattr(&entry, "user.cdpfs.key").is_ok_and(|key| key.ends_with('/')) {
                continue;
            }
            collect(&entry, out)?;
        }
    } else if meta.is_file() {
        out.push((path.to_path_buf(), meta.len()));
    }
    Ok(())
}

fn read_through(path: &Path, bar: &ProgressBar) -> std::io::Result<()> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => return Ok(()),
            n => bar.inc(n as u64),
        }
    }
}

/// The value of extended attribute `name` of `path`.
pub fn xattr(path: &Path, name: &str) -> std::io::Result<String> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let c_name = CString::new(name)?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: both strings are NUL-terminated and the buffer is valid for its length.
    let n = unsafe { libc::getxattr(c_path.as_ptr(), c_name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
