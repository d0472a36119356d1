//! The data path through a real mount: what the S3 server sees (GET counts and bytes) for
//! header reads, sequential streams and remounts, and that damaged, shared or interrupted disk
//! caches never serve a wrong byte.

mod common;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{shared, Mounted, TOMO_DIR};

/// These tests read the shared server's counters: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn counters() -> (u64, u64) {
    let (_, server) = shared();
    (server.gets.load(Ordering::SeqCst), server.bytes.load(Ordering::SeqCst))
}

fn mrc_key() -> String {
    format!("{TOMO_DIR}/TS_026.mrc")
}

/// Reads `path` start to end with 1 MiB reads, as `dd bs=1M` would.
fn read_all(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    File::open(path).unwrap().read_to_end(&mut out).unwrap();
    out
}

/// Block files in a cache directory.
fn block_files(cache: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for shard in fs::read_dir(cache.join("blocks")).unwrap().flatten() {
        files.extend(fs::read_dir(shard.path()).unwrap().flatten().map(|f| f.path()));
    }
    files
}

/// Waits until the background disk writes of `expected_bytes` have landed.
fn wait_for_blocks(cache: &Path, expected_bytes: u64) {
    let started = Instant::now();
    while block_files(cache).iter().map(|f| f.metadata().map_or(0, |m| m.len())).sum::<u64>() < expected_bytes {
        assert!(started.elapsed() < Duration::from_secs(20), "disk cache never filled");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn header_read_does_not_fetch_the_whole_file() {
    let _serial = serial();
    let (fixture, _) = shared();
    let cache = common::scratch_dir("cache-header");
    let mount = Mounted::with_cache("header", &cache);
    let size = fixture.objects[&mrc_key()].len() as u64;
    let before = counters();
    let mut header = [0u8; 1024];
    File::open(mount.join(&mrc_key())).unwrap().read_exact_at(&mut header, 0).unwrap();
    assert_eq!(header[..], fixture.objects[&mrc_key()][..1024]);
    let after = counters();
    assert!(after.1 - before.1 <= 2 << 20, "a 1 KiB header read fetched {} of {size} bytes", after.1 - before.1);
}

#[test]
fn sequential_read_uses_part_sized_gets_and_a_remount_uses_none() {
    let _serial = serial();
    let (fixture, _) = shared();
    let cache = common::scratch_dir("cache-remount");
    let key = mrc_key();
    let expected = &fixture.objects[&key];
    {
        let mount = Mounted::with_cache("remount-1", &cache);
        // Listing the folder reads the OME-Zarr metadata for its MRC views: not part of this.
        fs::metadata(mount.join(&key)).unwrap();
        let before = counters();
        assert!(read_all(&mount.join(&key)) == *expected);
        let gets = counters().0 - before.0;
        let parts = (expected.len() as u64).div_ceil(cdpfs::cache::PART_SIZE);
        assert!(gets <= parts + 8, "{gets} GETs for {parts} parts: not streaming in parts");
        assert_eq!(
            read_all(&mount.join("10000/dataset_metadata.json")),
            fixture.objects["10000/dataset_metadata.json"]
        );
        wait_for_blocks(&cache, expected.len() as u64);
    }
    let mount = Mounted::with_cache("remount-2", &cache);
    let before = counters();
    assert!(read_all(&mount.join(&key)) == *expected);
    assert_eq!(read_all(&mount.join("10000/dataset_metadata.json")), fixture.objects["10000/dataset_metadata.json"]);
    assert_eq!(counters().0 - before.0, 0, "a remount over a warm disk cache sent GETs");
    // Listings were persisted too: the tree is there without asking S3.
    assert!(cache.join("listings").read_dir().unwrap().count() > 0);
}

#[test]
fn a_cache_dir_given_relative_to_the_working_directory_is_written() {
    let _serial = serial();
    let (fixture, server) = shared();
    common::require_fuse();
    // `cdpfs mount mnt --cache-dir cache`, typed in the directory that holds both.
    let workdir = common::scratch_dir("relative-paths");
    fs::create_dir(workdir.join("mnt")).unwrap();
    let out = common::cdpfs()
        .current_dir(&workdir)
        .args(["mount", "mnt", "--bucket", common::BUCKET, "--endpoint-url", &server.addr_url()])
        .args(["--cache-dir", "cache"])
        .output()
        .unwrap();
    assert!(out.status.success(), "mount failed: {}", String::from_utf8_lossy(&out.stderr));
    let mount = Mounted { path: workdir.join("mnt") };
    let key = mrc_key();
    let expected = &fixture.objects[&key];
    assert!(read_all(&mount.join(&key)) == *expected);
    // The mount has left its working directory by now: the blocks still land in ./cache.
    wait_for_blocks(&workdir.join("cache"), expected.len() as u64);
}

#[test]
fn corrupted_and_truncated_cached_blocks_are_refetched() {
    let _serial = serial();
    let (fixture, _) = shared();
    let cache = common::scratch_dir("cache-corrupt");
    let key = mrc_key();
    let expected = &fixture.objects[&key];
    {
        let mount = Mounted::with_cache("corrupt-1", &cache);
        assert!(read_all(&mount.join(&key)) == *expected);
        wait_for_blocks(&cache, expected.len() as u64);
    }
    let files = block_files(&cache);
    assert!(files.len() > 4);
    for (i, file) in files.iter().enumerate() {
        let mut raw = fs::read(file).unwrap();
        match i % 3 {
            0 => {
                let middle = raw.len() / 2;
                raw[middle] ^= 0x01;
            }
            1 => raw.truncate(raw.len() * 2 / 3),
            _ => raw[20] ^= 0xff, // inside the header
        }
        fs::write(file, raw).unwrap();
    }
    let mount = Mounted::with_cache("corrupt-2", &cache);
    let before = counters();
    assert!(read_all(&mount.join(&key)) == *expected, "a damaged cached block was served");
    assert!(counters().0 > before.0, "damaged blocks must be fetched again");
}

#[test]
fn two_mounts_sharing_one_cache_directory_read_correct_bytes() {
    let _serial = serial();
    let (fixture, _) = shared();
    let cache = common::scratch_dir("cache-shared");
    let first = Mounted::with_cache("shared-1", &cache);
    let second = Mounted::with_cache("shared-2", &cache);
    let keys = [
        mrc_key(),
        "10001/24apr23a_Position_12/TiltSeries/100/24apr23a_Position_12.mrc".to_owned(),
        format!("{TOMO_DIR}/TS_026.zarr/0/1/1/1"),
    ];
    std::thread::scope(|scope| {
        for round in 0..2 {
            for mount in [&first, &second] {
                for key in &keys {
                    let expected = &fixture.objects[key];
                    scope.spawn(move || {
                        assert!(read_all(&mount.join(key)) == *expected, "{key} (round {round})");
                    });
                }
            }
        }
    });
}

#[test]
fn kill_9_while_caching_leaves_nothing_wrong_behind() {
    let _serial = serial();
    let (fixture, _) = shared();
    let cache = common::scratch_dir("cache-kill");
    let key = mrc_key();
    let mount = Mounted::with_cache("kill", &cache);
    let path = mount.join(&key);
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = File::open(path).and_then(|mut f| f.read_to_end(&mut buf));
    });
    std::thread::sleep(Duration::from_millis(300));
    let pid = common::serving_pid(&mount.path).expect("the mount's process");
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = reader.join();
    let started = Instant::now();
    while common::is_mounted(&mount.path) && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if common::is_mounted(&mount.path) {
        let _ = std::process::Command::new("fusermount3").arg("-u").arg("-z").arg(&mount.path).status();
    }
    drop(mount);
    let again = Mounted::with_cache("kill-again", &cache);
    for (key, bytes) in fixture.objects.iter().filter(|(k, _)| !k.contains("/Frames/")) {
        assert!(read_all(&again.join(key)) == *bytes, "{key} differs after kill -9 and remount");
    }
}

#[test]
fn files_carry_key_etag_url_and_cached_bytes_as_xattrs() {
    let _serial = serial();
    let (fixture, _) = shared();
    let cache = common::scratch_dir("cache-xattr");
    let mount = Mounted::with_cache("xattr", &cache);
    let key = "10001/24apr23a_Position_12/TiltSeries/100/24apr23a_Position_12.mrc";
    let path = mount.join(key);
    assert_eq!(cdpfs::stage::xattr(&path, "user.cdpfs.key").unwrap(), key);
    assert_eq!(cdpfs::stage::xattr(&path, "user.cdpfs.url").unwrap(), format!("s3://{}/{key}", common::BUCKET));
    // s3s-fs lists no ETags, so the value may be empty here; the attribute must still exist.
    assert!(cdpfs::stage::xattr(&path, "user.cdpfs.etag").is_ok());
    assert_eq!(cdpfs::stage::xattr(&path, "user.cdpfs.cached").unwrap(), "0");
    assert_eq!(read_all(&path), fixture.objects[key]);
    assert_eq!(cdpfs::stage::xattr(&path, "user.cdpfs.cached").unwrap(), fixture.objects[key].len().to_string());
    assert_eq!(cdpfs::stage::xattr(&path, "user.nope").unwrap_err().raw_os_error(), Some(libc::ENODATA));
    let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let mut names = vec![0u8; 1024];
    let n = unsafe { libc::listxattr(c_path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n > 0);
    let listed = String::from_utf8_lossy(&names[..n as usize]).into_owned();
    for name in ["user.cdpfs.key", "user.cdpfs.etag", "user.cdpfs.url", "user.cdpfs.cached"] {
        assert!(listed.split('\0').any(|l| l == name), "{name} not listed in {listed:?}");
    }
}

#[test]
fn cache_info_and_clear_report_and_refuse_while_mounted() {
    let _serial = serial();
    let (fixture, _) = shared();
    let cache = common::scratch_dir("cache-admin");
    let dir = cache.to_str().unwrap();
    let key = "10000/dataset_metadata.json";
    let mount = Mounted::with_cache("admin", &cache);
    assert_eq!(read_all(&mount.join(key)), fixture.objects[key]);
    wait_for_blocks(&cache, 1);
    let info = common::run_cdpfs(&["cache", "info", "--cache-dir", dir], Duration::from_secs(10));
    let text = String::from_utf8_lossy(&info.stdout).into_owned();
    assert!(
        info.status.success() && text.contains("blocks:    1 ") && text.contains(mount.path.to_str().unwrap()),
        "{text}"
    );
    let refused = common::run_cdpfs(&["cache", "clear", "--cache-dir", dir], Duration::from_secs(10));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains(mount.path.to_str().unwrap()));
    assert!(!block_files(&cache).is_empty(), "a refused clear removed blocks");
    drop(mount);
    let cleared = common::run_cdpfs(&["cache", "clear", "--cache-dir", dir], Duration::from_secs(10));
    assert!(cleared.status.success(), "{}", String::from_utf8_lossy(&cleared.stderr));
    assert!(block_files(&cache).is_empty());
    let info = common::run_cdpfs(&["cache", "info", "--cache-dir", dir], Duration::from_secs(10));
    assert!(String::from_utf8_lossy(&info.stdout).contains("blocks:    0 (0 B) of 0 objects"));
}

#[test]
fn prefetch_stages_a_folder_so_a_remount_reads_it_without_gets() {
    let _serial = serial();
    let (fixture, _) = shared();
    let cache = common::scratch_dir("cache-prefetch");
    let folder = "10000/TS_026/Reconstructions";
    let keys: Vec<&String> = fixture.objects.keys().filter(|k| k.starts_with(folder)).collect();
    let bytes: u64 = keys.iter().map(|k| fixture.objects[*k].len() as u64).sum();
    {
        let mount = Mounted::with_cache("prefetch-1", &cache);
        let target = mount.join(folder);
        let out = common::run_cdpfs(&["prefetch", "--jobs", "4", target.to_str().unwrap()], Duration::from_secs(60));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        // Listing the folder already read the small OME-Zarr metadata (for the MRC views).
        let summary = stdout.lines().last().unwrap_or_default();
        let numbers: Vec<u64> = summary.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
        assert!(summary.starts_with("prefetched ") && numbers.len() == 4, "{stdout}");
        assert_eq!(numbers[0] + numbers[2], keys.len() as u64, "{summary}");
        assert!(numbers[2] <= 3 && numbers[3] == 0, "{summary}");
        wait_for_blocks(&cache, bytes);
        let again = common::run_cdpfs(&["prefetch", target.to_str().unwrap()], Duration::from_secs(60));
        let stdout = String::from_utf8_lossy(&again.stdout).into_owned();
        assert!(stdout.contains(&format!("prefetched 0 files (0 bytes), {} already cached", keys.len())), "{stdout}");
        let missing = mount.join("10000/nope");
        let failed = common::run_cdpfs(&["prefetch", missing.to_str().unwrap()], Duration::from_secs(60));
        assert!(!failed.status.success());
        assert!(String::from_utf8_lossy(&failed.stderr).contains("10000/nope"));
    }
    let mount = Mounted::with_cache("prefetch-2", &cache);
    let before = counters();
    for key in &keys {
        assert!(read_all(&mount.join(key)) == fixture.objects[*key], "{key}");
    }
    assert_eq!(counters().0 - before.0, 0, "staged files were fetched again");
}

#[test]
fn prefetch_of_bucket_keys_needs_no_mount_and_a_later_mount_reads_them_without_gets() {
    let _serial = serial();
    let (fixture, server) = shared();
    let cache = common::scratch_dir("staged-keys");
    let (url, dir) = (server.addr_url(), cache.to_str().unwrap().to_owned());
    let prefetch = |targets: &[&str]| {
        let mut args = vec!["prefetch", "--endpoint-url", &url, "--bucket", common::BUCKET, "--cache-dir", &dir];
        args.extend_from_slice(targets);
        let out = common::run_cdpfs(&args, Duration::from_secs(60));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A prefix as an s3:// URL, and a bare key of --bucket.
    let folder = format!("s3://{}/{TOMO_DIR}/", common::BUCKET);
    let single = "10000/dataset_metadata.json";
    // A bare folder key, without its slash.
    let annotations = "10000/TS_026/Reconstructions/VoxelSpacing13.480/Annotations/100";
    let under = |dir: String| fixture.objects.keys().filter(move |k| k.starts_with(&dir));
    let mut keys: Vec<&String> = under(format!("{TOMO_DIR}/")).chain(under(format!("{annotations}/"))).collect();
    keys.push(fixture.objects.keys().find(|k| *k == single).unwrap());
    let bytes: u64 = keys.iter().map(|k| fixture.objects[*k].len() as u64).sum();
    let (ok, stdout, stderr) = prefetch(&[&folder, single, annotations]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains(&format!("prefetched {} files ({bytes} bytes), 0 already cached", keys.len())), "{stdout}");
    let (ok, stdout, _) = prefetch(&[&folder, single, annotations]);
    assert!(ok && stdout.contains(&format!("prefetched 0 files (0 bytes), {} already cached", keys.len())), "{stdout}");
    let missing = format!("s3://{}/10000/nope", common::BUCKET);
    let (ok, _, stderr) = prefetch(&[&missing]);
    assert!(!ok && stderr.contains(&missing), "{stderr}");

    let mount = Mounted::with_cache("prefetch-keys", &cache);
    let before = counters();
    for key in &keys {
        assert!(read_all(&mount.join(key)) == fixture.objects[*key], "{key}");
    }
    assert_eq!(counters().0 - before.0, 0, "staged objects were fetched again");
}

#[test]
fn stats_and_prometheus_metrics_report_the_mounts_traffic() {
    use std::io::Write;
    let _serial = serial();
    let (fixture, _) = shared();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mount = Mounted::new("stats", &["--no-disk-cache", "--metrics-addr", &addr]);
    let key = mrc_key();
    assert!(read_all(&mount.join(&key)) == fixture.objects[&key]);

    let out = common::run_cdpfs(&["stats", mount.path.to_str().unwrap(), "--json"], Duration::from_secs(10));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["s3_gets"].as_u64().unwrap() >= 4, "{json}");
    assert!(json["s3_bytes"].as_u64().unwrap() >= fixture.objects[&key].len() as u64, "{json}");
    assert!(json["bytes_served"].as_u64().unwrap() >= fixture.objects[&key].len() as u64, "{json}");
    assert!(json["read_p50_ms"].as_f64().unwrap() > 0.0, "{json}");
    let text = common::run_cdpfs(&["stats"], Duration::from_secs(10));
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains(mount.path.to_str().unwrap()) && text.contains("GETs"), "{text}");

    let mut socket = std::net::TcpStream::connect(&addr).unwrap();
    socket.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).unwrap();
    let gets: f64 = response
        .lines()
        .find_map(|l| l.strip_prefix("cdpfs_s3_gets_total "))
        .expect("cdpfs_s3_gets_total in the metrics")
        .parse()
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK") && gets >= 4.0, "{response}");
}

/// Real S3 is https: listings (the SDK's client) and data GETs (cdpfs's own receive path) both
/// go over TLS, with the server's certificate checked against the system's roots (here
/// `SSL_CERT_FILE`, which both honour) and the host name sent for SNI.
#[test]
fn a_mount_over_https_lists_and_reads_the_right_bytes() {
    let _serial = serial();
    let (fixture, server) = shared();
    let (ca, cert, key) = common::test_certificate("localhost");
    let Some(nginx) = common::Nginx::start_with(&server.addr_url(), Some((&cert, &key))) else { return };
    let mountpoint = common::scratch_dir("mnt-tls");
    let mount_with = |trust: &Path| {
        common::mount_command(&mountpoint, &nginx.url)
            .env("SSL_CERT_FILE", trust)
            .args(["--no-disk-cache", "--request-timeout", "3s", "--stall-timeout", "30s"])
            .output()
            .unwrap()
    };
    // A certificate the system does not trust: no connection, a clear error.
    let untrusted = mount_with(Path::new("/dev/null"));
    assert!(!untrusted.status.success() && !common::is_mounted(&mountpoint), "mounted over an untrusted certificate");
    let mounted = mount_with(&ca);
    let started = Instant::now();
    assert_lists_and_reads(mounted, mountpoint, &fixture.objects[&mrc_key()], "through the TLS proxy");
    // No piece waits for bytes the TLS layer already holds (they would come only when half the
    // stall timeout is up: 15 s).
    assert!(started.elapsed() < Duration::from_secs(10), "the read took {:?}", started.elapsed());
}

/// `out` (of a `cdpfs mount` of the shared fixture at `mountpoint`) mounted it: the tomogram's
/// folder lists and the MRC (`mrc`) reads byte-exact, its data fetched from the origin (`via`
/// says how it got there).
fn assert_lists_and_reads(out: std::process::Output, mountpoint: std::path::PathBuf, mrc: &[u8], via: &str) {
    assert!(out.status.success(), "mount failed: {}", String::from_utf8_lossy(&out.stderr));
    let mount = Mounted { path: mountpoint };
    let before = counters().0;
    assert!(fs::read_dir(mount.join(TOMO_DIR)).unwrap().count() > 0);
    assert!(read_all(&mount.join(&mrc_key())) == mrc, "wrong bytes {via}");
    assert!(counters().0 - before > 4, "the data did not come from the origin {via}");
}

/// An HPC node that reaches S3 only through an HTTP proxy (`HTTP_PROXY`): the endpoint's name
/// does not even resolve, so every request, listings and data GETs alike, must go through the
/// proxy (nginx in front of the test server).
#[test]
fn a_mount_behind_an_http_proxy_sends_every_request_through_it() {
    let _serial = serial();
    let (fixture, server) = shared();
    let Some(nginx) = common::Nginx::start(&server.addr_url()) else { return };
    let mountpoint = common::scratch_dir("mnt-behind-proxy");
    let out = common::mount_command(&mountpoint, "http://cdpfs-only-through-the-proxy.invalid")
        .env("HTTP_PROXY", &nginx.url)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .arg("--no-disk-cache")
        .output()
        .unwrap();
    assert_lists_and_reads(out, mountpoint, &fixture.objects[&mrc_key()], "through the proxy");
}

/// A node with a proxy for the outside world and a site mirror in `NO_PROXY`: data GETs to the
/// mirror take cdpfs's own receive path, as with no proxy at all; to an endpoint the proxy
/// covers, the SDK's client (which speaks to proxies). The mount's log says which.
#[test]
fn an_endpoint_in_no_proxy_is_read_directly_and_one_behind_the_proxy_through_the_sdk() {
    let _serial = serial();
    let (fixture, server) = shared();
    let sdk_line = "data GETs go through the AWS SDK's client and the proxy";
    let mount_with = |name: &str, no_proxy: &str| {
        let mountpoint = common::scratch_dir(&format!("mnt-{name}"));
        let log = common::scratch_dir(&format!("{name}-log")).join("cdpfs.log");
        let out = common::mount_command(&mountpoint, &server.addr_url())
            // A proxy that is not there: whatever goes through it fails.
            .env("HTTP_PROXY", "http://127.0.0.1:9")
            .env("NO_PROXY", no_proxy)
            .env_remove("no_proxy")
            .args(["--no-disk-cache", "--log-file", log.to_str().unwrap()])
            .output()
            .unwrap();
        (out, mountpoint, log)
    };
    let (out, mountpoint, log) = mount_with("no-proxy-mirror", "localhost, 127.0.0.1");
    assert_lists_and_reads(out, mountpoint, &fixture.objects[&mrc_key()], "past the proxy");
    let logged = fs::read_to_string(&log).unwrap();
    assert!(!logged.contains("through the AWS SDK's client"), "{logged}");
    // The same endpoint not in NO_PROXY: the SDK's client, and the dead proxy, are used.
    let (out, mountpoint, log) = mount_with("proxied-mirror", "example.org");
    assert!(!out.status.success(), "mounted through a proxy that is not there");
    let _ = fs::remove_dir(mountpoint);
    assert!(fs::read_to_string(&log).unwrap().contains(sdk_line));
}

#[test]
fn two_mounts_behind_a_caching_proxy_cost_the_origin_one_fetch_per_range() {
    let _serial = serial();
    let (fixture, server) = shared();
    let Some(nginx) = common::Nginx::start(&server.addr_url()) else { return };
    let key = mrc_key();
    let first_request = server.served.lock().unwrap().len();
    let mut gets_per_mount = Vec::new();
    for name in ["proxy-a", "proxy-b"] {
        let cache = common::scratch_dir(&format!("cache-{name}"));
        let mount = Mounted::new(name, &["--endpoint-url", &nginx.url, "--cache-dir", cache.to_str().unwrap()]);
        let before = counters().0;
        assert!(read_all(&mount.join(&key)) == fixture.objects[&key], "{name}: wrong bytes through the proxy");
        gets_per_mount.push(counters().0 - before);
    }
    let ranges = server.served.lock().unwrap()[first_request..].to_vec();
    let distinct: std::collections::BTreeSet<&String> = ranges.iter().collect();
    assert_eq!(distinct.len(), ranges.len(), "the origin served a range twice: {ranges:?}");
    assert!(gets_per_mount[0] > 4, "the first mount's reads never reached the origin: {gets_per_mount:?}");
    assert!(gets_per_mount[1] * 4 < gets_per_mount[0], "the second mount mostly missed the proxy: {gets_per_mount:?}");
}

#[test]
fn a_replaced_object_is_read_new_through_the_site_cache() {
    use std::os::unix::fs::OpenOptionsExt;
    let _serial = serial();
    let key = "replaced/tomogram.mrc";
    let (old, new) = (common::noise(3, 24 << 20), common::noise(4, (24 << 20) + 4096));
    let root = common::scratch_dir("bucket-proxy-replaced");
    common::put_object(&root, key, &old);
    let server = common::start_server(&root, common::Faults::default());
    let Some(nginx) = common::Nginx::start(&server.addr_url()) else { return };
    // One node reads the file whole: the proxy holds every block-sized range of the old version.
    let first = Mounted::on(&server, "proxy-old", &["--endpoint-url", &nginx.url]);
    assert!(read_all(&first.join(key)) == old, "wrong bytes through the proxy");
    drop(first);
    // Another has it open (O_DIRECT: no kernel read-ahead) when it is re-ingested.
    let live = Mounted::on(&server, "proxy-live", &["--endpoint-url", &nginx.url, "--metadata-ttl", "1h"]);
    let file = fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(live.join(key)).unwrap();
    let mut head = vec![0u8; 65536];
    file.read_exact_at(&mut head, 0).unwrap();
    assert!(head == old[..65536]);
    let served_before = server.gets.load(Ordering::SeqCst);
    common::put_object(&root, key, &new);
    // A part the handle has not read (nor read ahead), which the proxy does not hold either: the
    // origin answers with the new version, and its ETag gives it away.
    let error = file.read_exact_at(&mut head, 20 << 20).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ESTALE), "{error}");
    drop(file);
    // The next open on that node, and a fresh node, read the new version, though the proxy
    // still holds the old version's ranges under the same URLs and Range headers.
    for (name, mount) in
        [("the same node", &live), ("a new node", &Mounted::on(&server, "proxy-new", &["--endpoint-url", &nginx.url]))]
    {
        let mut bytes = Vec::new();
        let read = File::open(mount.join(key)).unwrap().read_to_end(&mut bytes);
        assert!(read.is_ok(), "{name}: the proxy answered the old version for the new ETag: {read:?}");
        assert!(bytes == new, "{name}: wrong bytes for the new version through the proxy");
    }
    let origin = server.gets.load(Ordering::SeqCst) - served_before;
    eprintln!(
        "proxy after re-ingest: open handle ESTALE, new opens read the new bytes, {origin} GETs reached the origin"
    );
    assert!(origin > 0, "the new version was never fetched from the origin");
}

#[test]
fn xattr_probes_of_unknown_names_do_not_look_at_the_cache() {
    let _serial = serial();
    let Some(strace) = ["/usr/bin/strace", "/bin/strace"].into_iter().find(|p| Path::new(p).exists()) else {
        eprintln!("SKIPPED: strace not installed");
        return;
    };
    let (fixture, _) = shared();
    let key = mrc_key();
    let cache = common::scratch_dir("cache-xattr-probe");
    // Every block on disk, none in the memory of the mount probed.
    let filled = Mounted::with_cache("xattr-fill", &cache);
    assert!(read_all(&filled.join(&key)) == fixture.objects[&key]);
    drop(filled);
    let mount = Mounted::with_cache("xattr-probe", &cache);
    let path = mount.join(&key);
    assert!(fs::metadata(&path).unwrap().len() > 8 << 20, "a file of several blocks");
    let trace = common::scratch_dir("xattr-strace").join("trace.txt");
    let pid = common::serving_pid(&mount.path).unwrap().to_string();
    let mut tracer = Command::new(strace)
        .args(["-f", "-qq", "-e", "trace=%file", "-o", trace.to_str().unwrap(), "-p", &pid])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1)); // attached to every thread
                                                // What `ls -l`, `cp -a` and `rsync -X` ask.
    let probes = ["security.selinux", "system.posix_acl_access", "user.unknown"];
    for _ in 0..10 {
        for name in probes {
            let error = cdpfs::stage::xattr(&path, name).unwrap_err();
            assert_eq!(error.raw_os_error(), Some(libc::ENODATA), "{name}: {error}");
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling a child we started and still own.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    let _ = tracer.wait();
    let text = fs::read_to_string(&trace).unwrap();
    let cache_name = cache.file_name().unwrap().to_str().unwrap();
    let touched: Vec<&str> = text.lines().filter(|l| l.contains(cache_name)).collect();
    eprintln!("30 xattr probes of unknown names: {} file syscalls on the cache dir", touched.len());
    assert!(touched.is_empty(), "unknown xattr names looked at the cache: {:?}", &touched[..touched.len().min(5)]);
}

#[test]
fn prefetch_counts_the_bytes_of_the_files_it_staged_only() {
    let (fixture, _) = shared();
    // Every GET of the tomogram fails; the files beside it are served.
    let faults = common::Faults { always: &[("TS_026.mrc", 500)], ..Default::default() };
    let server = common::start_server(&fixture.root, faults);
    let cache = common::scratch_dir("staged-with-a-failure");
    let folder = format!("s3://{}/{TOMO_DIR}/", common::BUCKET);
    let url = server.addr_url();
    let args = ["prefetch", &folder, "--endpoint-url", &url, "--cache-dir", cache.to_str().unwrap()];
    let out = common::run_cdpfs(&[&args[..], &["--request-timeout", "2s"]].concat(), Duration::from_secs(60));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{stdout}{stderr}");
    let (failed, fetched): (Vec<_>, Vec<_>) = fixture
        .objects
        .iter()
        .filter(|(key, _)| key.starts_with(&format!("{TOMO_DIR}/")))
        .partition(|(key, _)| key.contains("TS_026.mrc"));
    let bytes: usize = fetched.iter().map(|(_, data)| data.len()).sum();
    let summary =
        format!("prefetched {} files ({bytes} bytes), 0 already cached, {} failed", fetched.len(), failed.len());
    assert!(stdout.contains(&summary), "wanted {summary:?} in:\n{stdout}");
    assert!(stderr.contains("TS_026.mrc"), "{stderr}");
}
