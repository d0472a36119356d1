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

/// Runs `cdpfs args` with its stdout a pipe whose reader is already gone, as in
/// `cdpfs stats | head -1` once `head` has exited.
fn run_into_a_closed_pipe(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    common::cdpfs().args(args).stdin(std::process::Stdio::null()).stdout(writer).output().unwrap()
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let mount = common::Mounted::new("closed-pipe", &[]);
    let (_, server) = shared();
    let cache = common::scratch_dir("cache-closed-pipe");
    let cache = cache.to_str().unwrap();
    assert!(run_cdpfs(&["cache", "init", cache, "--size", "1G"], Duration::from_secs(10)).status.success());
    let mountpoint = mount.path.to_str().unwrap();
    let folder = mount.join("10000/TS_026");
    // Commands that only print die of SIGPIPE, as `ls` does.
    for args in [
        vec!["stats", mountpoint],
        vec!["stats", "--json", mountpoint],
        vec!["cache", "info", "--cache-dir", cache],
        vec!["info", folder.to_str().unwrap()],
        vec!["info", "--json", folder.to_str().unwrap()],
    ] {
        let out = run_into_a_closed_pipe(&args);
        assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "cdpfs {args:?}: {:?}, {}", out.status, stderr(&out));
        assert_eq!(stderr(&out), "", "cdpfs {args:?}");
    }
    // Those that also write to sockets finish their work, quietly.
    let url = server.addr_url();
    let snapshot = common::scratch_dir("snapshot-closed-pipe").join("10000.snapshot");
    let bucket = ["--bucket", BUCKET, "--endpoint-url", &url];
    for (args, done) in [
        (vec!["prefetch", "--cache-dir", cache, "10000/dataset_metadata.json"], None),
        (vec!["snapshot", "create", "10000/", "-o", snapshot.to_str().unwrap()], Some(&snapshot)),
    ] {
        let out = run_into_a_closed_pipe(&[&args[..], &bucket[..]].concat());
        assert!(out.status.success(), "cdpfs {args:?}: {:?}, {}", out.status, stderr(&out));
        assert_eq!(stderr(&out), "", "cdpfs {args:?}");
        assert!(done.is_none_or(|file| file.is_file()), "cdpfs {args:?} did its work");
    }
}

#[test]
fn boolean_variables_take_the_usual_words() {
    common::require_fuse();
    let (_, server) = shared();
    let mnt = common::scratch_dir("mnt-boolish");
    let cache = common::scratch_dir("cache-boolish");
    let out = common::mount_command(&mnt, &server.addr_url())
        .args(["--cache-dir", cache.to_str().unwrap()])
        .envs([
            ("CDPFS_NO_MRC_VIEWS", "yes"),
            ("CDPFS_ALLOW_OTHER", "1"),
            ("CDPFS_NO_PORTAL_API", "ON"),
            ("CDPFS_OFFLINE", "0"),
            ("CDPFS_SIGN_REQUESTS", "off"),
            ("CDPFS_WRITE_SHARED_CACHE", "no"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mount = common::Mounted { path: mnt.clone() };
    // Each word meant what it says: views hidden, other users let in, S3 asked (not offline).
    let tomograms = mount.join(common::TOMO_DIR);
    assert!(tomograms.join("TS_026.mrc").is_file());
    assert!(!tomograms.join("TS_026.bin2.mrc").exists(), "CDPFS_NO_MRC_VIEWS=yes hides the views");
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(mounts.lines().any(|l| l.contains(mnt.to_str().unwrap()) && l.contains("allow_other")), "{mounts}");
    drop(mount);
    // A word that is neither is refused, naming the option.
    let out = common::mount_command(&mnt, &server.addr_url()).env("CDPFS_OFFLINE", "maybe").output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("invalid value 'maybe' for '--offline'"), "{}", stderr(&out));
    assert!(!common::is_mounted(&mnt));
    // The option that means "yes" still needs its directory.
    let out = run_cdpfs(&["mount", mnt.to_str().unwrap(), "--write-shared-cache"], Duration::from_secs(10));
    assert_fails_with(&out, "--write-shared-cache needs --shared-cache-dir");
}

#[test]
fn invalid_endpoint_and_api_urls_are_refused_at_once() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mnt = common::scratch_dir("mnt-badurl");
    for (option, url, problem) in [
        ("--endpoint-url", "not a url".to_owned(), "no http:// or https:// scheme"),
        ("--endpoint-url", "http://not a url".to_owned(), "not a URL"),
        ("--endpoint-url", "http:///bucket".to_owned(), "not a URL"),
        ("--endpoint-url", format!("ftp://127.0.0.1:{port}"), "the scheme ftp:// is not supported"),
        ("--endpoint-url", format!("127.0.0.1:{port}"), "no http:// or https:// scheme"),
        ("--api-url", format!("127.0.0.1:{port}/graphql"), "no http:// or https:// scheme"),
    ] {
        for subcommand in [
            &["mount", mnt.to_str().unwrap()][..],
            &["prefetch", "10000/"],
            &["snapshot", "create", "10000/", "-o", "/dev/null"],
        ] {
            if option == "--api-url" && subcommand[0] != "mount" {
                continue;
            }
            let started = Instant::now();
            let out = run_cdpfs(&[subcommand, &[option, &url]].concat(), Duration::from_secs(10));
            assert!(started.elapsed() < Duration::from_secs(1), "{subcommand:?} {url:?} took {:?}", started.elapsed());
            assert_fails_with(&out, &format!("invalid {option} {url:?}: {problem}"));
            assert!(stderr(&out).contains("give http://HOST[:PORT] or https://HOST[:PORT]"), "{}", stderr(&out));
            assert!(!common::is_mounted(&mnt));
        }
    }
}

#[test]
fn prefetch_of_a_missing_path_in_a_mount_names_the_path_not_a_key() {
    let mount = common::Mounted::new("prefetch-missing", &[]);
    let (_, server) = shared();
    let cache = common::scratch_dir("cache-prefetch-missing");
    for missing in [mount.join("10000/no-such-run"), mount.join("no/such/folder")] {
        let out = run_cdpfs(
            &[
                "prefetch",
                missing.to_str().unwrap(),
                "--bucket",
                BUCKET,
                "--endpoint-url",
                &server.addr_url(),
                "--cache-dir",
                cache.to_str().unwrap(),
            ],
            Duration::from_secs(30),
        );
        assert_fails_with(&out, &format!("cannot prefetch {}: No such file or directory", missing.display()));
        assert!(!stderr(&out).contains("s3://"), "taken for a bucket key: {}", stderr(&out));
    }
}

#[test]
fn warnings_into_a_file_or_pipe_carry_no_colour_codes() {
    let (_, server) = shared();
    let cache = common::scratch_dir("cache-nocolour");
    let cache = cache.to_str().unwrap();
    assert!(run_cdpfs(&["cache", "init", cache, "--size", "1G"], Duration::from_secs(10)).status.success());
    // A differing --cache-size warns (the directory keeps its bound); stderr is a pipe here.
    let out = run_cdpfs(
        &[
            "prefetch",
            "10000/dataset_metadata.json",
            "--bucket",
            BUCKET,
            "--endpoint-url",
            &server.addr_url(),
            "--cache-dir",
            cache,
            "--cache-size",
            "2G",
        ],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.contains("WARN") && text.contains("differs from the cache directory's bound"), "{text}");
    assert!(!text.contains('\x1b'), "colour codes in {text:?}");
}

#[test]
fn every_cache_command_refuses_a_directory_that_is_no_cache() {
    let plain = common::scratch_dir("not-a-cache");
    let missing = plain.join("missing");
    for dir in [&missing, &plain] {
        for command in ["info", "trim", "clear"] {
            let out = run_cdpfs(&["cache", command, "--cache-dir", dir.to_str().unwrap()], Duration::from_secs(10));
            assert_fails_with(&out, &format!("{} is not a cdpfs cache directory", dir.display()));
            assert!(out.stdout.is_empty(), "cache {command}: {}", String::from_utf8_lossy(&out.stdout));
        }
    }
    assert!(!missing.exists(), "nothing was created");
}

#[test]
fn a_cache_smaller_than_one_block_is_refused() {
    let (_, server) = shared();
    let cache = common::scratch_dir("cache-tiny");
    let mnt = common::scratch_dir("mnt-tiny-cache");
    let (cache, url) = (cache.to_str().unwrap(), server.addr_url());
    for size in ["0", "1K", "511K"] {
        for args in [
            vec!["cache", "init", cache, "--size", size],
            vec!["mount", mnt.to_str().unwrap(), "--endpoint-url", &url, "--cache-dir", cache, "--cache-size", size],
            vec!["prefetch", "10000/", "--endpoint-url", &url, "--cache-dir", cache, "--cache-size", size],
        ] {
            let out = run_cdpfs(&args, Duration::from_secs(10));
            assert!(!out.status.success(), "{args:?}");
            let text = stderr(&out);
            assert!(text.contains(&format!("invalid value '{size}'")), "{args:?}: {text}");
            assert!(text.contains("a cache must hold at least one block of 512 KiB"), "{args:?}: {text}");
            assert!(!common::is_mounted(&mnt));
        }
    }
    assert!(!Path::new(cache).join("cdpfs-cache.json").exists(), "no bound was stored");
    let out = run_cdpfs(&["cache", "init", cache, "--size", "512K"], Duration::from_secs(10));
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_non_empty_mount_point_is_refused_unless_allowed() {
    common::require_fuse();
    let (_, server) = shared();
    let mnt = common::scratch_dir("mnt-nonempty");
    let cache = common::scratch_dir("cache-nonempty");
    fs::write(mnt.join("f"), b"mine").unwrap();
    let mount = |extra: &[&str], env: Option<(&str, &str)>| {
        let mut command = common::mount_command(&mnt, &server.addr_url());
        command.args(["--cache-dir", cache.to_str().unwrap()]).args(extra);
        command.envs(env);
        command.output().unwrap()
    };
    for foreground in [false, true] {
        let out = mount(if foreground { &["--foreground"] } else { &[] }, None);
        let wanted = format!("mount point {} is not empty", mnt.display());
        assert_fails_with(&out, &wanted);
        assert!(stderr(&out).contains("--allow-non-empty"), "{}", stderr(&out));
        assert!(!common::is_mounted(&mnt));
    }
    for (extra, env) in [(&["--allow-non-empty"][..], None), (&[][..], Some(("CDPFS_ALLOW_NON_EMPTY", "1")))] {
        let out = mount(extra, env);
        assert!(out.status.success(), "{extra:?} {env:?}: {}", stderr(&out));
        let mounted = common::Mounted { path: mnt.clone() };
        assert!(mounted.join("10000/dataset_metadata.json").is_file());
        assert!(!mounted.join("f").exists(), "hidden while mounted");
        let out = run_cdpfs(&["unmount", mnt.to_str().unwrap()], Duration::from_secs(30));
        assert!(out.status.success(), "{}", stderr(&out));
        std::mem::forget(mounted);
        assert_eq!(fs::read(mnt.join("f")).unwrap(), b"mine");
    }
}

/// `--offline` over a cache directory with no saved listing (empty, or staged with `cdpfs
/// prefetch s3://...`, which saves blocks only) would mount a tree that cannot even be listed:
/// refused, saying how to stage.
#[test]
fn offline_over_a_cache_with_nothing_listed_is_refused() {
    common::require_fuse();
    let mnt = common::scratch_dir("mnt-offline-empty");
    let empty_cache = common::scratch_dir("offline-empty-cache");
    let out = common::mount_command(&mnt, &shared().1.addr_url())
        .args(["--offline", "--cache-dir", empty_cache.to_str().unwrap()])
        .output()
        .unwrap();
    assert_fails_with(&out, "--offline: the cache directory has no saved listing");
    assert!(!common::is_mounted(&mnt));
}
