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
    // Unchanged for a whole second, not between two looks: the writers run at idle priority
    // and, with O_DIRECT, at the disk's pace, so on a busy disk the first file can take a while.
    let (mut last, mut unchanged) = (u64::MAX, 0);
    for _ in 0..150 {
        let now: u64 = block_files(cache).iter().map(|f| f.1).sum();
        unchanged = if now == last { unchanged + 1 } else { 0 };
        if unchanged == 5 {
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
        // In the foreground, so the node waits for it to finish its writes before the namespace
        // ends (which kills what is left in it).
        let mut script = format!(
            "set -e; hostname node; {cdpfs} mount {mnt} --bucket {BUCKET} --endpoint-url {url} --cache-dir {cache} \
             --cache-size 16M --max-memory 64M --log-file {log} --foreground & \
             for i in $(seq 600); do mountpoint -q {mnt} && break; sleep 0.05; done; mountpoint -q {mnt}; ",
            mnt = mnt.display(),
            cache = cache.display(),
            log = log.display()
        );
        for key in &keys[range] {
            script += &format!("cmp {}/{key} {}/{key}; ", mnt.display(), bucket_dir.display());
        }
        script += &format!(
            "{cdpfs} stats {mnt} --json > {stats}; {cdpfs} unmount {mnt}; wait",
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
        // Counted as refused by the directory, not as a full write queue (where the remedy
        // would be a faster disk).
        let out = run_cdpfs(&["stats", mount.path.to_str().unwrap(), "--json"], Duration::from_secs(10));
        let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(stats["cache_disk_writes_refused"].as_u64().unwrap() > 0, "{stats}");
        assert_eq!(stats["cache_disk_writes_dropped"], 0, "{stats}");
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
    // What it has not got is read from S3 and not offered to it: nothing is counted as a write
    // the queue had no room for.
    let other = "10001/24apr23a_Position_12/TiltSeries/100/24apr23a_Position_12.mrc";
    assert!(common::read_whole(&mount.join(other)) == fixture.objects[other]);
    let out = run_cdpfs(&["stats", mount.path.to_str().unwrap(), "--json"], Duration::from_secs(10));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["cache_disk_writes_dropped"], 0, "{stats}");
    assert_eq!(stats["cache_disk_writes"], 0, "{stats}");
    drop(mount);
    tier.remount("rw");
}

/// A TCP forwarder to an S3 server that can be switched off (new connections refused, open ones
/// cut) and on again, as a node losing and regaining its network. Counts the connections it
/// accepted.
struct Switch {
    port: u16,
    up: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
}

impl Switch {
    fn new(backend: std::net::SocketAddr) -> Switch {
        use std::net::{Shutdown, TcpListener, TcpStream};
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        let (up, accepted) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU64::new(0)));
        let (on, count) = (up.clone(), accepted.clone());
        std::thread::spawn(move || {
            let mut listener = Some(first);
            let mut open: Vec<TcpStream> = Vec::new();
            loop {
                if !on.load(Ordering::SeqCst) {
                    listener = None;
                    for stream in open.drain(..) {
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                if listener.is_none() {
                    listener = TcpListener::bind(("127.0.0.1", port)).ok();
                }
                let Some(server) = &listener else { continue };
                server.set_nonblocking(true).unwrap();
                match server.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        count.fetch_add(1, Ordering::SeqCst);
                        let Ok(upstream) = TcpStream::connect(backend) else { continue };
                        open.extend([client.try_clone().unwrap(), upstream.try_clone().unwrap()]);
                        for (mut from, mut to) in
                            [(client.try_clone().unwrap(), upstream.try_clone().unwrap()), (upstream, client)]
                        {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(Shutdown::Write);
                            });
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Switch { port, up, accepted }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn set(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unreachable(mount: &Mounted) -> bool {
    let out = run_cdpfs(&["stats", mount.path.to_str().unwrap(), "--json"], Duration::from_secs(10));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    stats["s3_unreachable"].as_bool().unwrap()
}

#[test]
fn a_node_without_s3_serves_what_is_cached_and_goes_back_online_without_a_remount() {
    let _serial = serial();
    let (fixture, server) = shared();
    let switch = Switch::new(server.addr);
    let url = switch.url();
    let cache = common::scratch_dir("offline-cache");
    let cache_dir = cache.to_str().unwrap();
    let staged = format!("{TOMO_DIR}/TS_026.mrc");
    let other = format!("{TOMO_DIR}/tomogram_metadata.json");
    {
        let mount = Mounted::on(server, "offline-stage", &["--endpoint-url", &url, "--cache-dir", cache_dir]);
        assert!(common::read_whole(&mount.join(&staged)) == fixture.objects[&staged]);
        wait_until_settled(&cache);
    }

    // S3 goes away; the node mounts anyway (saved listings are past their 1 s TTL by the reads).
    switch.set(false);
    let started = Instant::now();
    let mount = Mounted::on(
        server,
        "offline",
        &["--endpoint-url", &url, "--cache-dir", cache_dir, "--request-timeout", "3s", "--metadata-ttl", "1s"],
    );
    eprintln!("mounted with S3 unreachable in {:?}", started.elapsed());
    std::thread::sleep(Duration::from_millis(1100));
    assert!(common::read_whole(&mount.join(&staged)) == fixture.objects[&staged], "the staged file");
    let started = Instant::now();
    let error = fs::read(mount.join(&other)).unwrap_err();
    let waited = started.elapsed();
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    assert!(waited < Duration::from_secs(8), "EIO after {waited:?} with --request-timeout 3s");
    assert!(unreachable(&mount), "cdpfs stats does not say the mount is offline");

    // S3 is back: the mount notices by itself (it probes every --request-timeout), and reads
    // what was not cached.
    switch.set(true);
    let started = Instant::now();
    while unreachable(&mount) {
        assert!(started.elapsed() < Duration::from_secs(10), "the mount did not notice S3 is back");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(fs::read(mount.join(&other)).unwrap() == fixture.objects[&other]);
    drop(mount);

    // --offline asks S3 nothing at all.
    let before = switch.accepted.load(Ordering::SeqCst);
    let mount = Mounted::on(server, "forced-offline", &["--endpoint-url", &url, "--cache-dir", cache_dir, "--offline"]);
    assert!(common::read_whole(&mount.join(&staged)) == fixture.objects[&staged]);
    let started = Instant::now();
    let uncached = format!("{TOMO_DIR}/TS_026.zarr/.zgroup");
    assert!(fs::read(mount.join(&uncached)).is_err() || !fixture.objects.contains_key(&uncached));
    assert!(fs::read(mount.join("10001/dataset_metadata.json")).is_err(), "never listed, never cached");
    assert!(started.elapsed() < Duration::from_secs(1), "offline errors wait for nothing");
    assert!(unreachable(&mount));
    drop(mount);
    assert_eq!(switch.accepted.load(Ordering::SeqCst), before, "an --offline mount connected to S3");

    // With nothing cached, an unreachable endpoint still fails the mount, naming it.
    switch.set(false);
    let empty = common::scratch_dir("offline-empty");
    let extra = ["--cache-dir", empty.to_str().unwrap(), "--request-timeout", "2s"];
    assert_mount_fails("mnt-offline-empty", &url, &extra, "cannot reach");
}

/// Runs `cdpfs mount` of the bucket at `url` with `extra` options, and asserts that it fails
/// saying `message`.
fn assert_mount_fails(name: &str, url: &str, extra: &[&str], message: &str) {
    let mnt = common::scratch_dir(name);
    let mut args = vec!["mount", mnt.to_str().unwrap(), "--endpoint-url", url, "--bucket", BUCKET];
    args.extend_from_slice(extra);
    let out = run_cdpfs(&args, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(message), "{stderr}");
}

/// LIST pages the server has served, once none has come for 500 ms (the walk-ahead is done).
fn settled_lists(server: &common::Server) -> u64 {
    let mut last = server.lists.load(Ordering::SeqCst);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = server.lists.load(Ordering::SeqCst);
        if now == last {
            return now;
        }
        last = now;
    }
}

#[test]
fn an_ls_of_a_300_run_dataset_lists_politely() {
    let _serial = serial();
    // 300 runs, each with a tomogram, its 3-level OME-Zarr (chunk folders z/y/x) and annotations.
    let root = common::scratch_dir("polite-bucket");
    let mut objects = BTreeMap::new();
    for run in 0..300 {
        let base = format!("20000/run_{run:03}");
        objects.insert(format!("{base}/run_metadata.json"), b"{}".to_vec());
        let tomo = format!("{base}/Reconstructions/VoxelSpacing13.480/Tomograms/100");
        objects.insert(format!("{tomo}/run_{run:03}.mrc"), b"MRC".to_vec());
        for level in 0..3 {
            objects.insert(format!("{tomo}/run_{run:03}.zarr/{level}/.zarray"), b"{}".to_vec());
            for chunk in 0..2 {
                objects.insert(format!("{tomo}/run_{run:03}.zarr/{level}/{chunk}/0/0"), vec![1u8; 16]);
            }
        }
        let ann = format!("{base}/Reconstructions/VoxelSpacing13.480/Annotations/100");
        objects.insert(format!("{ann}/ribosome-1.0.json"), b"{}".to_vec());
    }
    common::write_bucket(&root, &objects);
    let server = common::start_server(&root, common::Faults::default());
    let mount = Mounted::on(&server, "polite", &["--no-mrc-views"]);
    let before = settled_lists(&server);
    let started = Instant::now();
    assert_eq!(fs::read_dir(mount.join("20000")).unwrap().count(), 300);
    let one_ls = settled_lists(&server) - before;
    let again = settled_lists(&server);
    fs::read_dir(mount.join("20000")).unwrap().count();
    let second_ls = settled_lists(&server) - again;
    eprintln!(
        "an ls of a 300-run dataset: {one_ls} LISTs (walk-ahead included, {:?}); the same ls again: {second_ls}",
        started.elapsed()
    );
    // A walk into the runs finds them listed.
    let run = mount.join("20000/run_042/Reconstructions/VoxelSpacing13.480/Tomograms/100");
    let walked = settled_lists(&server);
    assert_eq!(fs::read_dir(&run).unwrap().count(), 2);
    eprintln!("then an ls of one run's tomogram folder: {} LISTs", settled_lists(&server) - walked);
    // The root and the dataset, then the default budget of 256 background listings (4,098 with
    // the former 4096 budget and chunk folders walked, and 1,004 more for the same ls again).
    assert!(one_ls <= 2 + 256, "{one_ls} LISTs for one ls");
    assert_eq!(second_ls, 0, "the same folder was walked again within the TTL");
}

#[test]
fn a_node_reads_local_then_shared_then_s3_and_writes_the_shared_tier_only_when_told() {
    let _serial = serial();
    let (fixture, server) = shared();
    let url = server.addr_url();
    let tomogram = format!("{TOMO_DIR}/TS_026.mrc");
    let tilt_series = "10001/24apr23a_Position_12/TiltSeries/100/24apr23a_Position_12.mrc".to_owned();
    // The shared tier, staged by a prefetch (as a prolog on any node would).
    let shared_dir = common::scratch_dir("tier-shared");
    let shared_arg = shared_dir.to_str().unwrap();
    assert!(run_cdpfs(&["cache", "init", shared_arg, "--size", "256M"], Duration::from_secs(10)).status.success());
    let staged = run_cdpfs(
        &["prefetch", &format!("s3://{BUCKET}/{tomogram}"), "--endpoint-url", &url, "--cache-dir", shared_arg],
        Duration::from_secs(60),
    );
    assert!(staged.status.success(), "{}", String::from_utf8_lossy(&staged.stderr));
    let shared_files = block_files(&shared_dir);

    let local = common::scratch_dir("tier-local");
    let local_arg = local.to_str().unwrap();
    {
        // (No MRC views: finding them GETs Zarr metadata no tier holds.)
        let mount =
            Mounted::new("tiers", &["--cache-dir", local_arg, "--shared-cache-dir", shared_arg, "--no-mrc-views"]);
        let before = gets();
        assert!(common::read_whole(&mount.join(&tomogram)) == fixture.objects[&tomogram]);
        assert_eq!(gets(), before, "blocks in the shared tier were fetched from S3");
        assert!(common::read_whole(&mount.join(&tilt_series)) == fixture.objects[&tilt_series]);
        assert!(gets() > before, "the tilt series is in no tier");
        let out = run_cdpfs(&["stats", mount.path.to_str().unwrap(), "--json"], Duration::from_secs(10));
        let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(stats["cache_shared_hits"].as_u64().unwrap() > 0, "{stats}");
        wait_until_settled(&local);
    }
    assert_eq!(block_files(&shared_dir), shared_files, "a mount wrote or touched the shared tier without being told");
    // What came from the shared tier was copied into the local one.
    {
        let mount = Mounted::new("tiers-local", &["--cache-dir", local_arg, "--no-mrc-views"]);
        let before = gets();
        assert!(common::read_whole(&mount.join(&tomogram)) == fixture.objects[&tomogram]);
        assert!(common::read_whole(&mount.join(&tilt_series)) == fixture.objects[&tilt_series]);
        assert_eq!(gets(), before, "the local tier did not keep the blocks");
    }
    // Told to, a mount writes what it fetches into the shared tier too.
    let fresh = common::scratch_dir("tier-local-2");
    let mount = Mounted::new(
        "tiers-write",
        &["--cache-dir", fresh.to_str().unwrap(), "--shared-cache-dir", shared_arg, "--write-shared-cache"],
    );
    assert!(common::read_whole(&mount.join(&tilt_series)) == fixture.objects[&tilt_series]);
    // The first write may wait for the disk (busy with an earlier test's files, as in one CI run).
    let started = Instant::now();
    while block_files(&shared_dir).len() <= shared_files.len() && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_until_settled(&shared_dir);
    assert!(block_files(&shared_dir).len() > shared_files.len(), "--write-shared-cache wrote nothing");
    // A shared tier that is not a cache directory is a clear error.
    let bogus = common::scratch_dir("tier-bogus");
    assert_mount_fails(
        "mnt-tier-bogus",
        &url,
        &["--shared-cache-dir", bogus.to_str().unwrap()],
        "not a cdpfs cache directory",
    );
}

/// Every file below `dir`, read whole, by path relative to `base`.
fn read_tree(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            read_tree(base, &path, out);
        } else {
            out.insert(path.strip_prefix(base).unwrap().to_string_lossy().into_owned(), fs::read(&path).unwrap());
        }
    }
}

#[test]
fn a_snapshot_mount_lists_nothing_and_a_changed_object_is_estale() {
    let _serial = serial();
    let root = common::scratch_dir("snapshot-bucket");
    let mut objects = BTreeMap::new();
    for run in ["run_a", "run_b", "run c"] {
        objects.insert(format!("20000/{run}/Tomograms/100/{run}.mrc"), common::noise(run.len() as u64, 3 << 20));
        objects.insert(format!("20000/{run}/run_metadata.json"), b"{\"run\": 1}".to_vec());
    }
    objects.insert("20000/dataset_metadata.json".into(), b"{}".to_vec());
    objects.insert("20001/other.json".into(), b"{}".to_vec());
    common::write_bucket(&root, &objects);
    let server = common::start_server(&root, common::Faults::default());
    let url = server.addr_url();
    let file = common::scratch_dir("snapshot-file").join("20000.cdpfs-snapshot");
    let created = run_cdpfs(
        &["snapshot", "create", "20000", "-o", file.to_str().unwrap(), "--endpoint-url", &url, "--bucket", BUCKET],
        Duration::from_secs(30),
    );
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    assert!(
        String::from_utf8_lossy(&created.stdout).contains("7 objects"),
        "{}",
        String::from_utf8_lossy(&created.stdout)
    );

    let lists = server.lists.load(Ordering::SeqCst);
    let started = Instant::now();
    let mount = Mounted::on(&server, "snapshot", &["--namespace", file.to_str().unwrap(), "--prefix", "20000"]);
    eprintln!("mounted from a snapshot in {:?}", started.elapsed());
    let mut read = BTreeMap::new();
    read_tree(&mount.path, &mount.path, &mut read);
    let changed = "20000/run c/Tomograms/100/run c.mrc";
    let expected: BTreeMap<String, Vec<u8>> = objects
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("20000/")?.to_owned(), v.clone())))
        .filter(|(k, _)| !k.ends_with(".bin2.mrc"))
        .collect();
    assert_eq!(read.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    assert!(read == expected, "a file read differently");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(server.lists.load(Ordering::SeqCst), lists, "a snapshot mount sent LISTs");

    // Re-ingested after the snapshot: reads stay pinned to the snapshot's ETag.
    drop(mount);
    common::put_object(&root, changed, &common::noise(99, 3 << 20));
    let mount = Mounted::on(&server, "snapshot-2", &["--namespace", file.to_str().unwrap(), "--no-disk-cache"]);
    let error = fs::read(mount.join(changed)).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ESTALE), "{error}");
    assert_eq!(server.lists.load(Ordering::SeqCst), lists);
    drop(mount);

    // A damaged snapshot fails the mount with a clear error.
    let mut raw = fs::read(&file).unwrap();
    let middle = raw.len() / 2;
    raw[middle] ^= 0x20;
    fs::write(&file, raw).unwrap();
    let extra = ["--namespace", file.to_str().unwrap()];
    assert_mount_fails("mnt-snapshot-bad", &url, &extra, "not an intact cdpfs namespace snapshot");
}
