//! `mount(8)` helper support: `/sbin/mount.cdpfs` (a link to `cdpfs`) is called as
//! `mount.cdpfs SOURCE DIR [-o OPTIONS] [-s] [-f] [-n] [-v] [-t TYPE]`, e.g. for the fstab line
//! `cryoet-data-portal-public /mnt/cryoet cdpfs ro,allow_other,_netdev,cache_dir=/var/cache/cdpfs 0 0`.
//! This module turns such a call into the equivalent `cdpfs mount` command line.

use std::ffi::OsStr;
use std::path::Path;

use anyhow::{bail, Result};

/// `-o name=value` options and the `cdpfs mount` flag each becomes.
const VALUE_OPTIONS: [(&str, &str); 22] = [
    ("bucket", "--bucket"),
    ("region", "--region"),
    ("endpoint_url", "--endpoint-url"),
    ("prefix", "--prefix"),
    ("cache_dir", "--cache-dir"),
    ("cache_size", "--cache-size"),
    ("max_memory", "--max-memory"),
    ("kernel_read_ahead", "--kernel-read-ahead"),
    ("page_cache", "--page-cache"),
    ("metadata_ttl", "--metadata-ttl"),
    ("request_timeout", "--request-timeout"),
    ("stall_timeout", "--stall-timeout"),
    ("list_ahead", "--list-ahead"),
    ("api_url", "--api-url"),
    ("api_timeout", "--api-timeout"),
    ("api_ttl", "--api-ttl"),
    ("log_level", "--log-level"),
    ("log_file", "--log-file"),
    ("shared_cache_dir", "--shared-cache-dir"),
    ("namespace", "--namespace"),
    ("metrics_addr", "--metrics-addr"),
    ("synthetic_size", "--synthetic-size"),
];

/// `-o name` options and the `cdpfs mount` flag each becomes.
const FLAG_OPTIONS: [(&str, &str); 9] = [
    ("allow_other", "--allow-other"),
    ("allow_non_empty", "--allow-non-empty"),
    ("sign_requests", "--sign-requests"),
    ("no_disk_cache", "--no-disk-cache"),
    ("no_mrc_views", "--no-mrc-views"),
    ("no_portal_api", "--no-portal-api"),
    ("foreground", "--foreground"),
    ("offline", "--offline"),
    ("write_shared_cache", "--write-shared-cache"),
];

/// Generic mount options that cdpfs accepts and has nothing to do for (it is always read-only,
/// nosuid, nodev).
const GENERIC_OPTIONS: [&str; 22] = [
    "defaults",
    "ro",
    "rw",
    "auto",
    "noauto",
    "_netdev",
    "nofail",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "noatime",
    "atime",
    "relatime",
    "default_permissions",
];

/// Whether this process was started as a mount helper (`mount.cdpfs`, `mount.fuse.cdpfs`).
pub fn is_mount_helper(argv0: &OsStr) -> bool {
    Path::new(argv0).file_name().is_some_and(|name| name.to_string_lossy().starts_with("mount."))
}

/// The `cdpfs` command line (program name first) for a helper call's arguments (without argv0).
pub fn helper_to_cli(args: &[String]) -> Result<Vec<String>> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "-o" => options
                .extend(iter.next().map(|o| o.split(',').map(str::to_owned).collect::<Vec<_>>()).unwrap_or_default()),
            "-t" => {
                iter.next();
            }
            "-s" | "-f" | "-n" | "-v" => {}
            other if other.starts_with("-o") => options.extend(other[2..].split(',').map(str::to_owned)),
            other => positional.push(other.to_owned()),
        }
    }
    let [source, mountpoint] = positional.as_slice() else {
        bail!("usage: mount.cdpfs BUCKET MOUNTPOINT [-o options] (got {positional:?})");
    };
    let mut cli = vec!["cdpfs".to_owned(), "mount".to_owned(), mountpoint.clone()];
    let mut bucket = match source.as_str() {
        "cdpfs" | "none" => None,
        name => Some(name.to_owned()),
    };
    for option in options.iter().filter(|o| !o.is_empty()) {
        let (name, value) = match option.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (option.as_str(), None),
        };
        if let (Some(value), Some((_, flag))) = (value, VALUE_OPTIONS.iter().find(|(n, _)| *n == name)) {
            if name == "bucket" {
                bucket = Some(value.to_owned());
            } else {
                cli.extend([flag.to_string(), value.to_owned()]);
            }
        } else if let (None, Some((_, flag))) = (value, FLAG_OPTIONS.iter().find(|(n, _)| *n == name)) {
            cli.push(flag.to_string());
        } else if GENERIC_OPTIONS.contains(&option.as_str()) || name.starts_with("x-") || name == "comment" {
            continue;
        } else {
            bail!(
                "unknown mount option {option:?} (see `cdpfs mount --help`; write options with _, e.g. cache_dir=...)"
            );
        }
    }
    if let Some(bucket) = bucket {
        cli.extend(["--bucket".to_owned(), bucket]);
    }
    Ok(cli)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(line: &str) -> Result<Vec<String>> {
        helper_to_cli(&line.split(' ').map(str::to_owned).collect::<Vec<_>>())
    }

    #[test]
    fn an_fstab_line_becomes_a_mount_command() {
        let cli =
            call("cryoet-data-portal-public /mnt/cryoet -o ro,allow_other,_netdev,cache_dir=/var/cache/cdpfs").unwrap();
        assert_eq!(
            cli,
            [
                "cdpfs",
                "mount",
                "/mnt/cryoet",
                "--allow-other",
                "--cache-dir",
                "/var/cache/cdpfs",
                "--bucket",
                "cryoet-data-portal-public"
            ]
        );
        let cli =
            call("cdpfs /mnt/x -n -o rw,bucket=mirror,endpoint_url=http://s3.site:9000,x-systemd.automount -t cdpfs")
                .unwrap();
        assert_eq!(cli, ["cdpfs", "mount", "/mnt/x", "--endpoint-url", "http://s3.site:9000", "--bucket", "mirror"]);
        let cli = call("cdpfs /mnt/x -o page_cache=always").unwrap();
        assert_eq!(cli, ["cdpfs", "mount", "/mnt/x", "--page-cache", "always"]);
        let cli = call("cdpfs /mnt/x -o allow_non_empty").unwrap();
        assert_eq!(cli, ["cdpfs", "mount", "/mnt/x", "--allow-non-empty"]);
    }

    #[test]
    fn unknown_or_malformed_options_are_errors_naming_the_option() {
        assert!(call("b /m -o ro,bogus=1").unwrap_err().to_string().contains("\"bogus=1\""));
        assert!(call("b /m -o allow_other=yes").unwrap_err().to_string().contains("allow_other=yes"));
        assert!(call("b /m -o cache_dir").unwrap_err().to_string().contains("cache_dir"));
        assert!(call("/m").is_err());
    }

    #[test]
    fn helper_names_are_recognised() {
        assert!(is_mount_helper(OsStr::new("/sbin/mount.cdpfs")));
        assert!(is_mount_helper(OsStr::new("mount.fuse.cdpfs")));
        assert!(!is_mount_helper(OsStr::new("/usr/local/bin/cdpfs")));
    }
}
