//! Bad input gets a clear one-line error, a non-zero exit within a bounded time, and no mount.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{run_cdpfs, shared, BUCKET};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a failed run whose stderr names the problem.
fn assert_fails_with(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure, got success; stderr: {}", stderr(out));
    let text = stderr(out);
    assert!(text.contains(needle), "stderr should mention {needle:?}, got: {text}");
    assert!(text.starts_with("cdpfs: error:"), "a clear one-line error, got: {text}");
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn unknown_bucket_is_reported_and_nothing_is_mounted() {
    common::require_fuse();
    let (_, server) = shared();
    let mnt = common::scratch_dir("mnt-nobucket");
    let url = server.addr_url();
    for foreground in [false, true] {
        let mut args = vec!["mount", mnt.to_str().unwrap(), "--endpoint-url", &url, "--bucket", "no-such-bucket"];
        if foreground {
            args.push("--foreground");
        }
        let out = run_cdpfs(&args, Duration::from_secs(30));
        assert_fails_with(&out, "bucket \"no-such-bucket\" does not exist");
        assert!(!common::is_mounted(&mnt));
    }
}

#[test]
fn unreachable_endpoint_fails_within_a_bounded_time() {
    common::require_fuse();
    // A port nothing listens on: bind, learn the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mnt = common::scratch_dir("mnt-unreachable");
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let out = run_cdpfs(
        &["mount", mnt.to_str().unwrap(), "--endpoint-url", &url, "--request-timeout", "5s"],
        Duration::from_secs(30),
    );
    assert_fails_with(&out, "cannot reach");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    assert!(!common::is_mounted(&mnt));
}

#[test]
fn an_endpoint_that_never_answers_fails_within_a_bounded_time() {
    common::require_fuse();
    // Accepts connections and never answers, like a black-holed proxy.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let mnt = common::scratch_dir("mnt-silent");
    let started = Instant::now();
    let out = run_cdpfs(
        &["mount", mnt.to_str().unwrap(), "--endpoint-url", &url, "--request-timeout", "3s"],
        Duration::from_secs(30),
    );
    assert_fails_with(&out, "cannot reach");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(!common::is_mounted(&mnt));
}

#[test]
fn missing_and_non_directory_mount_points_are_rejected() {
    let (_, server) = shared();
    let url = server.addr_url();
    let missing = common::scratch_dir("mnt-missing").join("does/not/exist");
    let out = run_cdpfs(&["mount", missing.to_str().unwrap(), "--endpoint-url", &url], Duration::from_secs(10));
    assert_fails_with(&out, "does not exist");
    let file = common::scratch_dir("mnt-file").join("plain-file");
    fs::write(&file, b"x").unwrap();
    let out = run_cdpfs(&["mount", file.to_str().unwrap(), "--endpoint-url", &url], Duration::from_secs(10));
    assert_fails_with(&out, "not a directory");
}

#[test]
fn a_busy_mount_point_is_rejected() {
    let mount = common::Mounted::new("busy", &[]);
    let (_, server) = shared();
    let out = run_cdpfs(
        &["mount", mount.path.to_str().unwrap(), "--endpoint-url", &server.addr_url(), "--bucket", BUCKET],
        Duration::from_secs(10),
    );
    assert_fails_with(&out, "already a mount point");
    // The first mount is untouched.
    assert!(mount.join("10000/dataset_metadata.json").is_file());
}

#[test]
fn missing_fusermount3_says_to_install_fuse3() {
    let (_, server) = shared();
    let mnt = common::scratch_dir("mnt-nofusermount");
    let out = common::cdpfs()
        .args(["mount", mnt.to_str().unwrap(), "--endpoint-url", &server.addr_url()])
        .env("PATH", "/nonexistent")
        .env_remove("FUSERMOUNT_PATH")
        .output()
        .unwrap();
    assert_fails_with(&out, "install fuse3");
    assert!(!common::is_mounted(&mnt));
}

#[test]
fn missing_dev_fuse_is_explained() {
    common::require_fuse();
    if !Path::new("/usr/bin/unshare").exists() {
        panic!("unshare (util-linux) is needed to hide /dev/fuse");
    }
    let (_, server) = shared();
    let mnt = common::scratch_dir("mnt-nodevfuse");
    // A private mount namespace with an empty /dev: no /dev/fuse there.
    let script = format!(
        "mount -t tmpfs none /dev && exec {} mount {} --foreground --endpoint-url {}",
        env!("CARGO_BIN_EXE_cdpfs"),
        mnt.display(),
        server.addr_url()
    );
    let out =
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    assert_fails_with(&out, "/dev/fuse is missing");
}

#[test]
fn bad_arguments_are_rejected_before_anything_starts() {
    let mnt = common::scratch_dir("mnt-badargs");
    let out = run_cdpfs(&["mount", mnt.to_str().unwrap(), "--prefix", "a/../b"], Duration::from_secs(10));
    assert_fails_with(&out, "invalid --prefix");
    let out = run_cdpfs(&["mount", mnt.to_str().unwrap(), "--metadata-ttl", "soon"], Duration::from_secs(10));
    assert!(!out.status.success());
    let out = run_cdpfs(&["unmount", mnt.to_str().unwrap()], Duration::from_secs(10));
    assert_fails_with(&out, "not mounted");
}

/// Installs `/sbin/mount.cdpfs` -> the binary under test for as long as it lives.
struct MountHelper(bool);

impl MountHelper {
    fn install() -> MountHelper {
        let helper = Path::new("/sbin/mount.cdpfs");
        if helper.exists() {
            return MountHelper(false);
        }
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_cdpfs"), helper).unwrap();
        MountHelper(true)
    }
}

impl Drop for MountHelper {
    fn drop(&mut self) {
        if self.0 {
            let _ = fs::remove_file("/sbin/mount.cdpfs");
        }
    }
}

#[test]
fn an_fstab_line_mounts_with_the_mount_command_and_unknown_options_are_named() {
    common::require_fuse();
    let (fixture, server) = shared();
    let _helper = MountHelper::install();
    let mnt = common::scratch_dir("mnt-fstab");
    let cache = common::scratch_dir("cache-fstab");
    let fstab = common::scratch_dir("fstab").join("fstab");
    let line = |extra: &str| {
        format!(
            "{BUCKET} {} cdpfs ro,allow_other,_netdev,endpoint_url={},cache_dir={},metadata_ttl=10m{extra} 0 0\n",
            mnt.display(),
            server.addr_url(),
            cache.display()
        )
    };
    fs::write(&fstab, line(",bogus_option=1")).unwrap();
    let out = Command::new("mount").arg("-T").arg(&fstab).arg(&mnt).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus_option"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!common::is_mounted(&mnt));

    fs::write(&fstab, line("")).unwrap();
    let out = Command::new("mount").arg("-T").arg(&fstab).arg(&mnt).output().unwrap();
    assert!(out.status.success(), "mount -T failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(common::is_mounted(&mnt));
    let key = "10000/dataset_metadata.json";
    assert_eq!(fs::read(mnt.join(key)).unwrap(), fixture.objects[key]);
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(mounts.lines().any(|l| l.contains(mnt.to_str().unwrap()) && l.contains("allow_other")));
    let out = Command::new("umount").arg(&mnt).output().unwrap();
    assert!(out.status.success(), "umount failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!common::is_mounted(&mnt));
}
