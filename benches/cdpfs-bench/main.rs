//! cdpfs benchmark: the shapes users really read, each through a fresh mount with a fresh cache
//! directory, against a raw baseline (cdpfs's own S3 client doing the ideal ranged GETs
//! directly) measured in the same run, on a loopback origin in its own process that models WAN
//! S3 (first-byte latency per request, bandwidth cap per connection) and serves files from disk.
//!
//! Run: `cargo bench --bench cdpfs-bench` (as root). Options: `--latency-ms N` (30),
//! `--bandwidth-mbps N` (80, MB/s per connection), `--mrc-nz N` (368: the MRC is 1260 x 1260 x N
//! float32; `--mrc-mib N` picks N for about that many MiB), `--random-reads N` (300), `--runs N`
//! (3), `--smoke` (tiny sizes, one run: checks the harness, not the speed; CI runs it),
//! `--only 1,4,...` (case groups below), `--mount-args "..."` (options added to every mount, to
//! measure a setting). Medians over the runs; one markdown table on stdout.
//!
//! Case groups (letters as in the table):
//! - 1: a. cold sequential read of the MRC with 1 MiB `read()`s, disk tier on and with
//!   `--no-disk-cache`, and the ratio of the two; b. second and third read on the same mount
//!   (the first pass bypassed the page cache; the third reads from it) and re-read after a
//!   remount over the same cache directory. Raw: the whole MRC in 8 MiB GETs, best of 16
//!   and 32 in flight (the table says which won).
//! - 2: g. cdpfs alone: a generated file of the MRC's size (`--synthetic-size`, no network),
//!   cold with the disk tier on and off, and a second read: the cost of the FUSE and cache
//!   layers.
//! - 4: d. random 64 KiB `pread`s at unaligned offsets, one thread: p50 latency. Raw: one GET each.
//! - 5: c. the 3dmod pattern: the 1024-byte header, then 50 whole XY sections at random distinct
//!   z, one `pread` each, one thread. Raw: each section as 16 (or 8: best of both) parallel GETs,
//!   one section after the other.
//! - 6: e. Zarr: a whole level (16 chunk objects read whole by 4 threads, then by 1) and one 256^3 float32
//!   chunk (64 MiB, one thread). Raw: the objects in 8 MiB GETs, 16 in flight.
//! - 7: find + stat over a dataset tree, cold and after a remount. Raw: one LIST per folder, serially.
//! - 8: f. 1, 4 and 16 concurrent sequential readers, each its own stripe of the MRC. Raw: as in 1.
//! - 9: f. 32 concurrent readers with `--max-memory 256M`, disk tier on: peak RSS of cdpfs.
//! - 10: the binned MRC views of the tomogram's OME-Zarr pyramid.
//!
//! Every row: the headline number (MB/s, s or ms), its ratio to the raw baseline, bytes the
//! origin sent / bytes the reader asked for, and CPU seconds per GB asked for, of the cdpfs
//! process (from /proc/PID/stat) and of the raw client (this process, from getrusage; the
//! origin runs in a child process). Path lookups are done before the clock starts.
//!
//! The origin is this binary run again with `--serve-origin DIR` (see `origin.rs`).

mod cases;
mod fixture;
mod mount;
mod origin;
mod pyramid;
mod raw;
mod report;
mod tree;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cdpfs::store::ObjectMeta;
use fixture::{Fixture, MrcShape, Spec};
use mount::Mount;
use origin::{OriginProcess, Shaping};
use raw::{Raw, Request};
use report::{measure, Row, Sample};

/// Edge of the real tomogram's XY section (1260 x 1260 float32: 6,350,400 bytes).
const SECTION_NX: u64 = 1260;

pub struct Options {
    shaping: Shaping,
    mrc: MrcShape,
    zarr_chunk: u64,
    zarr_block: u64,
    runs: usize,
    runs_dataset: usize,
    random_reads: usize,
    only: Option<Vec<u32>>,
    /// Options added to every `cdpfs mount` (to measure a setting: `--kernel-read-ahead 1M`).
    mount_args: Vec<String>,
    /// Set in the origin process: the folder to serve.
    serve_origin: Option<PathBuf>,
}

impl Options {
    fn wants(&self, case: u32) -> bool {
        self.only.as_ref().is_none_or(|cases| cases.contains(&case))
    }
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1));
    let value = |name: &str, default: u64| -> u64 { arg(name).and_then(|v| v.parse().ok()).unwrap_or(default) };
    let smoke = args.iter().any(|a| a == "--smoke");
    let nx = if smoke { 256 } else { SECTION_NX };
    let nz_for_mib =
        arg("--mrc-mib").and_then(|v| v.parse::<u64>().ok()).map(|mib| ((mib << 20) / (nx * nx * 4)).max(1));
    Options {
        shaping: Shaping {
            latency: Duration::from_millis(value("--latency-ms", 30)),
            bytes_per_sec: value("--bandwidth-mbps", 80) * 1_000_000,
        },
        mrc: MrcShape { nx, ny: nx, nz: nz_for_mib.unwrap_or(value("--mrc-nz", if smoke { 64 } else { 368 })) },
        zarr_chunk: if smoke { 2 << 20 } else { 32 << 20 },
        zarr_block: if smoke { 4 << 20 } else { 256 * 256 * 256 * 4 },
        runs: value("--runs", if smoke { 1 } else { 3 }) as usize,
        runs_dataset: if smoke { 20 } else { 300 },
        random_reads: value("--random-reads", if smoke { 20 } else { 300 }) as usize,
        only: arg("--only").map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect()),
        mount_args: arg("--mount-args").map(|v| v.split_whitespace().map(String::from).collect()).unwrap_or_default(),
        serve_origin: arg("--serve-origin").map(PathBuf::from),
    }
}

/// What every case works with.
pub struct Bench {
    opts: Options,
    origin: OriginProcess,
    fixture: Fixture,
    raw: Raw,
}

impl Bench {
    fn mount(&self, cache_dir: &Path, extra: &[&str]) -> Mount {
        // Every case starts with the disk idle: no writeback left over from the fixture or an
        // earlier case's cache directory.
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        let extra: Vec<&str> = extra.iter().copied().chain(self.opts.mount_args.iter().map(String::as_str)).collect();
        Mount::new(&self.origin.endpoint(), cache_dir, &extra)
    }

    /// Measures `work` on `mount`, with the CPU time of its cdpfs process.
    fn on<T>(&self, mount: &Mount, wanted: u64, work: impl FnOnce() -> T) -> (Sample, T) {
        measure(&self.origin, Some(&|| mount.cpu_seconds()), wanted, work)
    }

    /// Measures `work` on a fresh mount (`extra` options) over a fresh cache directory, once
    /// `keys` have been looked up.
    fn fresh<T>(&self, extra: &[&str], keys: &[&str], wanted: u64, work: impl FnOnce(&Mount) -> T) -> (Sample, T) {
        let cache = mount::cache_dir();
        let mount = self.mount(cache.path(), extra);
        for key in keys {
            std::fs::metadata(mount.file(key)).unwrap();
        }
        self.on(&mount, wanted, || work(&mount))
    }

    /// Measures `work` done by the raw client, with this process's CPU time.
    fn raw_with<T>(&self, wanted: u64, work: impl FnOnce() -> T) -> (Sample, T) {
        measure(&self.origin, None, wanted, work)
    }

    /// The raw client sending `batches` one after the other, `parallel` GETs in flight.
    fn raw(&self, batches: Vec<Vec<Request>>, parallel: usize, wanted: u64) -> Sample {
        self.raw_with(wanted, || self.raw.get(batches, parallel)).0
    }

    /// `key` as the origin lists it (its ETag included, so raw GETs send `If-Match`).
    fn object(&self, key: &str) -> Arc<ObjectMeta> {
        Arc::new(self.fixture.object(key))
    }

    /// The raw client fetching `keys` whole in `part`-byte GETs, `parallel` in flight.
    fn raw_objects(&self, keys: &[&str], part: u64, parallel: usize) -> Sample {
        let objects: Vec<_> = keys.iter().map(|key| self.object(key)).collect();
        let wanted = objects.iter().map(|o| o.size).sum();
        let requests = objects.iter().flat_map(|o| raw::parts(o, 0..o.size, part)).collect();
        self.raw(vec![requests], parallel, wanted).noted(format!("{} MiB GETs, {parallel} in flight", part >> 20))
    }

    /// The raw baseline of a whole-file read: the MRC in 8 MiB GETs, best of 16 and 32 in flight.
    fn raw_whole_mrc(&self) -> Sample {
        report::best([16, 32].map(|parallel| self.raw_objects(&[fixture::MRC_KEY], 8 << 20, parallel)).into())
    }
}

/// A case group: its rows, measured.
type Group = fn(&Bench) -> Vec<Row>;

fn main() {
    let opts = options();
    if let Some(dir) = &opts.serve_origin {
        origin::serve(dir, opts.shaping);
    }
    let spec = Spec {
        mrc: opts.mrc,
        zarr_chunk: opts.zarr_chunk,
        zarr_block: opts.zarr_block,
        runs_dataset: opts.runs_dataset,
        pyramid: opts.wants(10),
    };
    eprintln!("writing the fixture ...");
    let fixture = Fixture::create(&spec);
    let origin = OriginProcess::start(fixture.root(), opts.shaping);
    let raw = Raw::new(&origin.endpoint());
    eprintln!(
        "origin: {} ms first byte, {} MB/s per connection; MRC {} x {} x {} float32 ({} bytes); {} runs each; \
         load average {} (the CPU may be shared); mount options added: {:?}",
        opts.shaping.latency.as_millis(),
        opts.shaping.bytes_per_sec / 1_000_000,
        opts.mrc.nx,
        opts.mrc.ny,
        opts.mrc.nz,
        opts.mrc.size(),
        opts.runs,
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').next().unwrap_or("?"),
        opts.mount_args
    );
    let bench = Bench { opts, origin, fixture, raw };
    let groups: [(u32, Group); 9] = [
        (1, cases::sequential),
        (2, cases::synthetic),
        (4, cases::random),
        (5, cases::imod),
        (6, cases::zarr),
        (7, tree::walk),
        (8, cases::readers),
        (9, cases::bounded),
        (10, tree::views),
    ];
    let mut rows = Vec::new();
    for (group, case) in groups {
        if bench.opts.wants(group) {
            eprintln!("case group {group} ...");
            rows.extend(case(&bench));
        }
    }
    report::print_table(&rows);
}
