//! One cache directory for a whole cluster: mounts and `cdpfs prefetch` runs on "nodes" (each in
//! its own mount, UTS and PID namespace, with colliding host names and pids) share one cache
//! directory and its one bound; a prolog's prefetch evicts nothing a mount uses; a large cache
//! mounts at once; full and read-only cache directories still mount and serve.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{run_cdpfs, shared, Mounted, BUCKET, TOMO_DIR};

/// Tests that count the shared server's GETs, or time a mount, run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const BLOCK: u64 = 512 << 10;

/// Block files (and temp files being written) under a cache dir: their paths and sizes.
fn block_files(cache: &Path) -> Vec<(PathBuf, u64)> {
    let mut files = Vec::new();
    for shard in fs::read_dir(cache.join("blocks")).into_iter().flatten().flatten() {
        for file in fs::read_dir(shard.path()).into_iter().flatten().flatten() {
            files.push((file.path(), file.metadata().map_or(0, |m| m.len())));
        }
    }
    files
}

fn gets() -> u64 {
    shared().1.gets.load(Ordering::SeqCst)
}

/// Waits until no block write is pending: the cache dir's size stops changing.
fn wait_until_settled(cache: &Path) {
    let mut last = u64::MAX;
    for _ in 0..100 {
        let now: u64 = block_files(cache).iter().map(|f| f.1).sum();
        if now == last {
            return;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn nodes_sharing_one_cache_dir_keep_its_one_bound_and_read_every_byte_right() {
    let _serial = serial();
    common::require_fuse();
    assert!(Command::new("unshare").arg("--version").output().is_ok_and(|o| o.status.success()), "needs unshare");
    // A bucket of its own: 12 objects of 48 MiB.
    let root = common::scratch_dir("cluster-bucket");
    let objects: BTreeMap<String, Vec<u8>> =
        (0..12).map(|i| (format!("cluster/obj-{i:02}.bin"), common::noise(1000 + i, 48 << 20))).collect();
    common::write_bucket(&root, &objects);
    drop(objects);
    let server = common::start_server(&root, common::Faults::default());
    let keys: Vec<String> = (0..12).map(|i| format!("cluster/obj-{i:02}.bin")).collect();
    let cache = common::scratch_dir("cluster-cache");
    let bound: u64 = 256 << 20;
    let init = run_cdpfs(&["cache", "init", cache.to_str().unwrap(), "--size", "256M"], Duration::from_secs(10));
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));

    // Watch the directory's size while the nodes run.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (done, peak, cache) = (done.clone(), peak.clone(), cache.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let used: u64 = block_files(&cache).iter().map(|f| f.1).sum();
                peak.fetch_max(used, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let cdpfs = env!("CARGO_BIN_EXE_cdpfs");
    let url = server.addr_url();
    let bucket_dir = root.join(BUCKET);
    let work = common::scratch_dir("cluster-nodes");
    // Three mounts reading overlapping sets of files, two prolog-style prefetches.
    let mut scripts = Vec::new();
    for (node, range) in [(0, 0..6), (1, 3..9), (2, 6..12)] {
        let mnt = work.join(format!("mnt-{node}"));
        fs::create_dir_all(&mnt).unwrap();
        let log = work.join(format!("node-{node}.log"));
        let mut script = format!(
            "set -e; hostname node; {cdpfs} mount {mnt} --bucket {BUCKET} --endpoint-url {url} --cache-dir {cache} \
             --cache-size 16M --max-memory 64M --log-file {log}; ",
            mnt = mnt.display(),
            cache = cache.display(),
            log = log.display()
        );
        for key in &keys[range] {
            script += &format!("cmp {}/{key} {}/{key}; ", mnt.display(), bucket_dir.display());
        }
        script += &format!(
            "{cdpfs} stats {mnt} --json > {stats}; {cdpfs} unmount {mnt}",
            mnt = mnt.display(),
            stats = work.join(format!("stats-{node}.json")).display()
        );
        scripts.push(script);
    }
    for wanted in [[0, 2, 4, 6], [7, 9, 10, 11]] {
        let targets: Vec<String> = wanted.iter().map(|&i| format!("s3://{BUCKET}/{}", keys[i])).collect();
        scripts.push(format!(
            "set -e; hostname node; {cdpfs} prefetch {} --endpoint-url {url} --cache-dir {} --cache-size 1M -j 2",
            targets.join(" "),
            cache.display()
        ));
    }
    let started = Instant::now();
    let nodes: Vec<_> = scripts
        .iter()
        .map(|script| {
            Command::new("unshare")
                .args(["--mount", "--uts", "--pid", "--fork", "sh", "-c", script])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = nodes.into_iter().map(|node| node.wait_with_output().unwrap()).collect();
    let elapsed = started.elapsed();
    wait_until_settled(&cache);
    done.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    for (script, out) in scripts.iter().zip(&outputs) {
        assert!(
            out.status.success(),
            "a node failed: {script}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let peak = peak.load(Ordering::SeqCst);
    let writers = scripts.len() as u64;
    eprintln!(
        "5 nodes read 1.2 GiB in {elapsed:?}; peak cache dir {} MiB against a bound of {} MiB",
        peak >> 20,
        bound >> 20
    );
    assert!(peak <= bound + writers * (BLOCK + 4096), "the cache dir grew to {peak} bytes, bound {bound}");
    for node in 0..3 {
        let stats: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(work.join(format!("stats-{node}.json"))).unwrap()).unwrap();
        assert!(stats["cache_disk_writes"].as_u64().unwrap() > 0, "node {node} wrote nothing: {stats}");
        let log = fs::read_to_string(work.join(format!("node-{node}.log"))).unwrap();
        assert!(!log.contains("refused a write") && !log.contains("could not write"), "node {node}: {log}");
        assert!(log.contains("differs from the cache directory's bound"), "node {node} did not warn: {log}");
    }
    let leftovers: Vec<_> = block_files(&cache)
        .into_iter()
        .filter(|(p, _)| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temp files left behind: {leftovers:?}");
    for node in 0..3 {
        assert!(!common::is_mounted(&work.join(format!("mnt-{node}"))));
    }
}

#[test]
fn a_prolog_prefetch_with_a_small_cache_size_evicts_nothing_a_mount_uses() {
    let _serial = serial();
    let (fixture, server) = shared();
    let cache = common::scratch_dir("prolog-cache");
    let init = run_cdpfs(&["cache", "init", cache.to_str().unwrap(), "--size", "256M"], Duration::from_secs(10));
    assert!(init.status.success());
    let key = format!("{TOMO_DIR}/TS_026.mrc");
    let mount = Mounted::with_cache("prolog", &cache);
    assert!(common::read_whole(&mount.join(&key)) == fixture.objects[&key]);
    wait_until_settled(&cache);
    let before: Vec<PathBuf> = block_files(&cache).into_iter().map(|f| f.0).collect();
    assert!(!before.is_empty());
    // The prolog of the next job stages other files with a (too) small --cache-size.
    let others: Vec<String> =
        fixture.objects.keys().filter(|k| **k != key && !k.ends_with('/')).take(20).map(|k| k.to_string()).collect();
    let mut args = vec!["prefetch", "--endpoint-url"];
    let url = server.addr_url();
    args.push(&url);
    args.extend(["--bucket", BUCKET, "--cache-dir", cache.to_str().unwrap(), "--cache-size", "1M"]);
    args.extend(others.iter().map(String::as_str));
    let out = run_cdpfs(&args, Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("differs from the cache directory's bound"), "{stderr}");
    let missing: Vec<_> = before.iter().filter(|p| !p.exists()).collect();
    assert!(missing.is_empty(), "the prefetch evicted {} blocks the mount had read", missing.len());
    // Read again on a fresh mount of the same directory: all from disk.
    drop(mount);
    let mount = Mounted::with_cache("prolog-2", &cache);
    let before = gets();
    assert!(common::read_whole(&mount.join(&key)) == fixture.objects[&key]);
    assert_eq!(gets(), before, "a block was fetched again");
    let trim = run_cdpfs(&["cache", "trim", "--cache-dir", cache.to_str().unwrap()], Duration::from_secs(30));
    assert!(trim.status.success(), "{}", String::from_utf8_lossy(&trim.stderr));
    assert!(String::from_utf8_lossy(&trim.stdout).contains("0 blocks (0 B) evicted"));
}

#[test]
fn a_cache_dir_of_100k_blocks_mounts_ready_in_under_2_s() {
    let _serial = serial();
    let cache = common::scratch_dir("cache-100k");
    for shard in 0..256u64 {
        let dir = cache.join(format!("blocks/{shard:02x}"));
        fs::create_dir_all(&dir).unwrap();
        for n in 0..391u64 {
            fs::write(dir.join(format!("{:016x}-{n}", shard << 56 | n)), b"stale block").unwrap();
        }
    }
    let (fixture, _) = shared();
    let started = Instant::now();
    let mount = Mounted::with_cache("ready-100k", &cache);
    let ready = started.elapsed();
    eprintln!("a cache dir of {} blocks: mount ready in {ready:?}", 256 * 391);
    assert!(ready < Duration::from_secs(2), "the mount took {ready:?} to be ready");
    let key = format!("{TOMO_DIR}/TS_026.mrc");
    assert!(common::read_whole(&mount.join(&key)) == fixture.objects[&key]);
}

/// A tmpfs of `size` mounted at a fresh directory; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(name: &str, size: &str) -> Tmpfs {
        let path = common::scratch_dir(name);
        let ok =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&path).status();
        assert!(ok.unwrap().success(), "mounting a tmpfs");
        Tmpfs(path)
    }

    fn remount(&self, options: &str) {
        let ok = Command::new("mount").args(["-o", &format!("remount,{options}")]).arg(&self.0).status();
        assert!(ok.unwrap().success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

#[test]
fn full_and_read_only_cache_dirs_mount_and_serve() {
    let _serial = serial();
    let (fixture, _) = shared();
    let key = format!("{TOMO_DIR}/TS_026.mrc");
    let expected = &fixture.objects[&key];

    // Full: the mount serves from memory and S3.
    let full = Tmpfs::new("full-cache", "1M");
    let filler = fs::write(full.0.join("filler"), vec![0u8; 2 << 20]);
    assert!(filler.is_err(), "the tmpfs should be full");
    {
        let log = common::scratch_dir("full-log").join("log");
        let mount =
            Mounted::new("full", &["--cache-dir", full.0.to_str().unwrap(), "--log-file", log.to_str().unwrap()]);
        assert!(common::read_whole(&mount.join(&key)) == *expected);
        // The blocks it tried to write were refused: writes pause, reads go on.
        let started = Instant::now();
        while !fs::read_to_string(&log).unwrap().contains("refused a write") {
            assert!(started.elapsed() < Duration::from_secs(10), "{}", fs::read_to_string(&log).unwrap());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(common::read_whole(&mount.join(&key)) == *expected);
    }

    // Read-only: a cache written before is read, never written.
    let tier = Tmpfs::new("ro-cache", "128M");
    {
        let mount = Mounted::with_cache("ro-fill", &tier.0);
        assert!(common::read_whole(&mount.join(&key)) == *expected);
        wait_until_settled(&tier.0);
    }
    let written = block_files(&tier.0).len();
    assert!(written as u64 >= (expected.len() as u64).div_ceil(BLOCK));
    tier.remount("ro");
    let mount = Mounted::with_cache("ro-read", &tier.0);
    let before = gets();
    assert!(common::read_whole(&mount.join(&key)) == *expected);
    assert_eq!(gets(), before, "the read-only tier was not used");
    drop(mount);
    tier.remount("rw");
}
