//! The read cases (groups 1, 4, 5, 6, 8 and 9 of `main.rs`): how each reader reads through the
//! mount, what the raw client does instead, and the rows they make.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::fixture::{Rng, BLOCK_KEY, MRC_KEY};
use crate::mount::{self, Mount};
use crate::raw;
use crate::report::{self, median, Row, Sample, Unit};
use crate::Bench;

/// Bytes per `read()` of a sequential reader.
const READ: usize = 1 << 20;
/// Bytes per random read.
const RANDOM_READ: u64 = 64 << 10;
/// Sections the 3dmod case reads.
const SECTIONS: usize = 50;

/// How much of the file at `path` the kernel's page cache holds, as a sample's note ("N% in the
/// page cache before"); empty where the kernel has no `cachestat` (Linux 6.5+).
fn page_cache_note(path: &Path) -> String {
    use std::os::fd::AsRawFd;
    /// `cachestat`'s number (the same on every architecture).
    const SYS_CACHESTAT: libc::c_long = 451;
    #[repr(C)]
    struct Range {
        offset: u64,
        len: u64,
    }
    let file = File::open(path).unwrap();
    let pages = file.metadata().unwrap().len().div_ceil(4096).max(1);
    // Whole file (length 0: to its end); out: cached, dirty, writeback, evicted, recently evicted.
    let range = Range { offset: 0, len: 0 };
    let mut stat = [0u64; 5];
    // SAFETY: the fd is open for the call; `range` and `stat` are the kernel's `cachestat_range`
    // and `cachestat` (five u64s) in layout; flags must be 0.
    let done = unsafe { libc::syscall(SYS_CACHESTAT, file.as_raw_fd(), &range, stat.as_mut_ptr(), 0) };
    match done {
        0 => format!("{}% in the page cache before", stat[0] * 100 / pages),
        _ => String::new(),
    }
}

/// Reads the whole file at `path` with `READ`-byte `read()` calls; returns its length.
pub fn read_whole(path: &Path) -> u64 {
    let mut file = File::open(path).unwrap();
    let mut buf = vec![0u8; READ];
    let mut total = 0;
    loop {
        match file.read(&mut buf).unwrap() {
            0 => return total,
            n => total += n as u64,
        }
    }
}

/// `readers` threads, each reading its own stripe of the `size`-byte file at `path` with
/// `READ`-byte `pread`s, from start to end.
fn read_stripes(path: &Path, size: u64, readers: u64) {
    let stripe = size.div_ceil(readers);
    std::thread::scope(|scope| {
        for i in 0..readers {
            scope.spawn(move || {
                let file = File::open(path).unwrap();
                let mut buf = vec![0u8; READ];
                let (mut offset, end) = (i * stripe, ((i + 1) * stripe).min(size));
                while offset < end {
                    let want = buf.len().min((end - offset) as usize);
                    let n = file.read_at(&mut buf[..want], offset).unwrap();
                    assert!(n > 0, "early end of file at {offset}");
                    offset += n as u64;
                }
            });
        }
    });
}

/// `threads` threads reading `keys` whole, each key by one thread.
fn read_files(mount: &Mount, keys: &[&str], threads: usize) {
    std::thread::scope(|scope| {
        for worker in 0..threads {
            scope.spawn(move || {
                for key in keys.iter().skip(worker).step_by(threads) {
                    std::fs::read(mount.file(key)).unwrap();
                }
            });
        }
    });
}

/// Runs `read` and returns how long it took, in seconds.
fn timed(read: impl FnOnce()) -> f64 {
    let started = Instant::now();
    read();
    started.elapsed().as_secs_f64()
}

/// A sample whose time is the median of the `latencies` measured in it.
fn p50((sample, latencies): (Sample, Vec<f64>)) -> Sample {
    Sample { seconds: median(latencies), ..sample }
}

/// 1: a. cold sequential read, disk tier on and off; b. second and third read on the same
/// mount (the first pass bypassed the page cache, the second fills it), re-read after remount.
pub fn sequential(b: &Bench) -> Vec<Row> {
    let size = b.fixture.mrc.size();
    let read = |mount: &Mount| assert_eq!(read_whole(&mount.file(MRC_KEY)), size);
    let (mut on, mut off, mut second, mut warm, mut remount, mut raw) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..b.opts.runs {
        let cache = mount::cache_dir();
        {
            let mount = b.mount(cache.path(), &[]);
            std::fs::metadata(mount.file(MRC_KEY)).unwrap();
            on.push(b.on(&mount, size, || read(&mount)).0);
            // Whether the page cache holds the file before each re-read (the second should find
            // none of it: the first read bypassed it).
            let cached = page_cache_note(&mount.file(MRC_KEY));
            second.push(b.on(&mount, size, || read(&mount)).0.noted(cached));
            let cached = page_cache_note(&mount.file(MRC_KEY));
            warm.push(b.on(&mount, size, || read(&mount)).0.noted(cached));
            std::thread::sleep(Duration::from_secs(1)); // let background disk writes land
        }
        let mount = b.mount(cache.path(), &[]);
        std::fs::metadata(mount.file(MRC_KEY)).unwrap();
        remount.push(b.on(&mount, size, || read(&mount)).0);
        drop(mount);
        off.push(b.fresh(&["--no-disk-cache"], &[MRC_KEY], size, read).0);
        raw.push(b.raw_whole_mrc());
    }
    vec![
        Row::compare("a. cold sequential read, MRC, 1 MiB read()s, disk tier on", Unit::MBps, &on, &raw, ">= 0.9x"),
        Row::compare("a. same, --no-disk-cache", Unit::MBps, &off, &raw, ">= 0.9x"),
        Row::versus(
            "a. disk tier's cost: cold read with / without it",
            Unit::MBps,
            ("on", &on),
            ("off", &off),
            ">= 0.95x",
        ),
        Row::compare("b. second read, same mount (memory, disk tier, S3)", Unit::MBps, &second, &raw, "-"),
        Row::compare("b. warm re-read: third read, same mount (page cache)", Unit::MBps, &warm, &raw, ">= 2000 MB/s"),
        Row::compare("b. re-read after remount, same cache dir", Unit::MBps, &remount, &raw, "0 GETs"),
    ]
}

/// 2: g. cdpfs alone: a generated file as large as the MRC (`--synthetic-size`, no network),
/// read cold with the disk tier on and off, and a second time: what the FUSE and cache layers
/// cost.
pub fn synthetic(b: &Bench) -> Vec<Row> {
    let size = b.fixture.mrc.size();
    let key = cdpfs::store::synthetic::KEY;
    let read = |mount: &Mount| assert_eq!(read_whole(&mount.file(key)), size);
    let generated = ["--synthetic-size".to_owned(), size.to_string()];
    let generated: Vec<&str> = generated.iter().map(String::as_str).collect();
    let without_disk: Vec<&str> = generated.iter().copied().chain(["--no-disk-cache"]).collect();
    let (mut on, mut off, mut warm) = (vec![], vec![], vec![]);
    for _ in 0..b.opts.runs {
        off.push(b.fresh(&without_disk, &[key], size, read).0);
        let cache = mount::cache_dir();
        let mount = b.mount(cache.path(), &generated);
        std::fs::metadata(mount.file(key)).unwrap();
        on.push(b.on(&mount, size, || read(&mount)).0);
        warm.push(b.on(&mount, size, || read(&mount)).0);
    }
    vec![
        Row::compare("g. generated bytes, no network: cold read, disk tier on", Unit::MBps, &on, &[], "-"),
        Row::compare("g. same, --no-disk-cache", Unit::MBps, &off, &[], "-"),
        Row::compare("g. same, second read (memory, disk tier)", Unit::MBps, &warm, &[], "-"),
    ]
}

/// 4: d. random 64 KiB preads at unaligned offsets, one thread; raw: one GET each.
pub fn random(b: &Bench) -> Vec<Row> {
    let size = b.fixture.mrc.size();
    let (mut cdpfs, mut raw) = (vec![], vec![]);
    for run in 0..b.opts.runs {
        let mut rng = Rng::new(100 + run as u64);
        let offsets: Vec<u64> = (0..b.opts.random_reads).map(|_| rng.below(size - RANDOM_READ)).collect();
        let wanted = offsets.len() as u64 * RANDOM_READ;
        cdpfs.push(p50(b.fresh(&[], &[MRC_KEY], wanted, |mount| {
            let file = File::open(mount.file(MRC_KEY)).unwrap();
            let mut buf = vec![0u8; RANDOM_READ as usize];
            offsets.iter().map(|&o| timed(|| file.read_exact_at(&mut buf, o).unwrap())).collect()
        })));
        let object = b.object(MRC_KEY);
        raw.push(p50(b.raw_with(wanted, || {
            offsets.iter().map(|&o| timed(|| b.raw.get(vec![vec![(object.clone(), o..o + RANDOM_READ)]], 1))).collect()
        })));
    }
    let case = format!("d. {} random 64 KiB preads, 1 thread: p50 latency", b.opts.random_reads);
    vec![Row::compare(case, Unit::Millis, &cdpfs, &raw, "<= 1.1x; fetched <= 1.2")]
}

/// 5: c. the 3dmod pattern: header, then whole XY sections at random distinct z, one thread.
pub fn imod(b: &Bench) -> Vec<Row> {
    let (mrc, section) = (b.fixture.mrc, b.fixture.mrc.section());
    let (mut cdpfs, mut raw) = (vec![], vec![]);
    let mut count = 0;
    for run in 0..b.opts.runs {
        let zs = Rng::new(200 + run as u64).distinct(mrc.nz, SECTIONS);
        count = zs.len();
        let starts: Vec<u64> = zs.iter().map(|z| 1024 + z * section).collect();
        let wanted = 1024 + starts.len() as u64 * section;
        cdpfs.push(
            b.fresh(&[], &[MRC_KEY], wanted, |mount| {
                let file = File::open(mount.file(MRC_KEY)).unwrap();
                file.read_exact_at(&mut [0u8; 1024], 0).unwrap();
                let mut buf = vec![0u8; section as usize];
                for &start in &starts {
                    file.read_exact_at(&mut buf, start).unwrap();
                }
            })
            .0,
        );
        let object = b.object(MRC_KEY);
        let variants = [16, 8].map(|parts| {
            let header = vec![(object.clone(), 0..1024)];
            let sections = starts.iter().map(|&s| raw::split(&object, s..s + section, parts));
            let batches = std::iter::once(header).chain(sections).collect();
            b.raw(batches, parts as usize, wanted).noted(format!("{parts} GETs per section"))
        });
        raw.push(report::best(variants.into()));
    }
    let case = format!("c. 3dmod: header + {count} XY sections of {section} bytes at random z, 1 thread");
    vec![Row::compare(case, Unit::Seconds, &cdpfs, &raw, "<= 1.2x; fetched <= 1.2")]
}

/// 6: e. Zarr: a whole level (16 chunk objects, by 4 threads as dask does and by 1 as
/// zarr-python does alone), and one 256^3 chunk (1 thread).
pub fn zarr(b: &Bench) -> Vec<Row> {
    let level: Vec<&str> = b.fixture.zarr_chunks.iter().map(String::as_str).collect();
    let [mut level_runs, mut serial_runs, mut level_raw, mut block_runs, mut block_raw] = [(); 5].map(|()| vec![]);
    for _ in 0..b.opts.runs {
        let level_bytes = level.iter().map(|key| b.fixture.size(key)).sum();
        level_runs.push(b.fresh(&[], &level, level_bytes, |mount| read_files(mount, &level, 4)).0);
        serial_runs.push(b.fresh(&[], &level, level_bytes, |mount| read_files(mount, &level, 1)).0);
        level_raw.push(b.raw_objects(&level, 8 << 20, 16));
        let block_bytes = b.fixture.size(BLOCK_KEY);
        block_runs.push(b.fresh(&[], &[BLOCK_KEY], block_bytes, |mount| read_files(mount, &[BLOCK_KEY], 1)).0);
        block_raw.push(b.raw_objects(&[BLOCK_KEY], 8 << 20, 16));
    }
    let chunk_mib = b.fixture.size(level[0]) >> 20;
    let block_mib = b.fixture.size(BLOCK_KEY) >> 20;
    vec![
        Row::compare(
            format!("e. Zarr level: {} chunk objects of {chunk_mib} MiB read whole, 4 threads", level.len()),
            Unit::MBps,
            &level_runs,
            &level_raw,
            ">= 0.8x",
        ),
        Row::compare(
            "e. Zarr level: the same chunk objects read whole one after another, 1 thread",
            Unit::MBps,
            &serial_runs,
            &level_raw,
            "-",
        ),
        Row::compare(
            format!("e. Zarr 256^3 block: one {block_mib} MiB chunk object read whole, 1 thread"),
            Unit::MBps,
            &block_runs,
            &block_raw,
            ">= 0.8x",
        ),
    ]
}

/// 8: f. 1, 4 and 16 concurrent sequential readers, each its own stripe of the MRC.
pub fn readers(b: &Bench) -> Vec<Row> {
    let size = b.fixture.mrc.size();
    let counts = [1, 4, 16];
    let mut samples = counts.map(|_| vec![]);
    let mut raw = vec![];
    for _ in 0..b.opts.runs {
        for (readers, runs) in counts.iter().zip(&mut samples) {
            runs.push(b.fresh(&[], &[MRC_KEY], size, |m| read_stripes(&m.file(MRC_KEY), size, *readers)).0);
        }
        raw.push(b.raw_whole_mrc());
    }
    let row = |(readers, runs): (&u64, &Vec<Sample>)| {
        let case = format!("f. {readers} concurrent sequential reader(s), one stripe of the MRC each");
        Row::compare(case, Unit::MBps, runs, &raw, ">= 0.9x")
    };
    counts.iter().zip(&samples).map(row).collect()
}

/// 9: f. 32 concurrent sequential readers under `--max-memory 256M`, disk tier on: peak RSS.
pub fn bounded(b: &Bench) -> Vec<Row> {
    const BOUND: u64 = 256 << 20;
    let size = b.fixture.mrc.size();
    let (mut cdpfs, mut raw, mut peak) = (vec![], vec![], 0);
    for _ in 0..b.opts.runs {
        let (sample, rss) = b.fresh(&["--max-memory", "256M"], &[MRC_KEY], size, |mount| {
            read_stripes(&mount.file(MRC_KEY), size, 32);
            mount.peak_rss()
        });
        cdpfs.push(sample);
        peak = peak.max(rss);
        raw.push(b.raw_whole_mrc());
    }
    let case = "f. 32 concurrent readers, one stripe of the MRC each, --max-memory 256M, disk tier on";
    let target = format!("RSS <= {} MiB", (BOUND * 11 / 10) >> 20);
    vec![Row::compare(case, Unit::MBps, &cdpfs, &raw, &target)
        .with(&format!("peak RSS {} MiB (max of runs)", peak >> 20))]
}
