//! The read path, measured where it counts: bytes and GETs at the S3 server for a section
//! read, small random reads and a stream of an MRC tomogram of the portal's section size
//! (1260 x 1260 float32), and reads through cache directories that are slow or hung.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::slowfs::SlowMount;
use common::{start_server, Faults, Mounted, Server};

const KEY: &str = "10002/TS_1/Reconstructions/VoxelSpacing10.000/Tomograms/100/TS_1.mrc";
const NX: usize = 1260;
const NZ: usize = 8;
const SECTION: u64 = (NX * NX * 4) as u64;

/// A tomogram larger than the memory tier of a small mount (its first pass bypasses the page
/// cache, as every file's of one S3 part, 8 MiB, or more does).
const LARGE_KEY: &str = "10002/TS_2/Reconstructions/VoxelSpacing10.000/Tomograms/100/TS_2.mrc";
const LARGE_NZ: usize = 11;
/// A tomogram longer than the read-ahead a header read starts with (64 MiB), read through.
const LONG_KEY: &str = "10002/TS_5/Reconstructions/VoxelSpacing10.000/Tomograms/100/TS_5.mrc";
const LONG_NZ: usize = 32;

/// A level of an OME-Zarr: 2 x 3 x 3 chunk objects (`z/y/x`) of a little over two blocks each.
const ZARR_LEVEL: &str = "10002/TS_3/Reconstructions/VoxelSpacing10.000/Tomograms/100/TS_3.zarr/0/";
const ZARR_CHUNK: usize = (1 << 20) + 4321;

/// A level stored with flat keys (`z.y.x`), 12 small chunks along x (fetched whole, as one block).
const FLAT_LEVEL: &str = "10002/TS_4/Reconstructions/VoxelSpacing10.000/Tomograms/100/TS_4.zarr/1/";
const FLAT_CHUNKS: u64 = 12;
const FLAT_CHUNK: usize = 100_000;

/// The paths of the test levels' chunks: `z/y/x` in the nested level, `0.0.x` in the flat one.
fn chunk_paths() -> impl Iterator<Item = String> {
    let nested = (0..2).flat_map(|z| (0..3).flat_map(move |y| (0..3).map(move |x| format!("{z}/{y}/{x}"))));
    nested.chain((0..FLAT_CHUNKS).map(|x| format!("0.0.{x}")))
}

/// The key and bytes of chunk `path` of the test levels.
fn chunk_source(path: &str) -> (String, Vec<u8>) {
    let [z, y, x]: [u64; 3] =
        path.split(['/', '.']).map(|n| n.parse().unwrap()).collect::<Vec<_>>().try_into().unwrap();
    match path.contains('/') {
        true => (format!("{ZARR_LEVEL}{path}"), common::noise(100 + z * 9 + y * 3 + x, ZARR_CHUNK)),
        false => (format!("{FLAT_LEVEL}{path}"), common::noise(200 + x, FLAT_CHUNK)),
    }
}

/// The tomogram's bytes and the server holding it (one per test binary).
fn bucket() -> &'static (Vec<u8>, Server) {
    static BUCKET: OnceLock<(Vec<u8>, Server)> = OnceLock::new();
    BUCKET.get_or_init(|| {
        let root = common::scratch_dir("read-path-fixture");
        let objects = BTreeMap::from([
            (KEY.to_owned(), common::mrc_bytes((NX, NX, NZ), 10.0, 5)),
            (LARGE_KEY.to_owned(), large_source().clone()),
            (LONG_KEY.to_owned(), long_source().clone()),
        ]);
        let mut objects = objects;
        objects.extend(chunk_paths().map(|path| chunk_source(&path)));
        common::write_bucket(&root, &objects);
        let server = start_server(&root, Faults::default());
        (objects[KEY].clone(), server)
    })
}

/// The large tomogram's bytes.
fn large_source() -> &'static Vec<u8> {
    static LARGE: OnceLock<Vec<u8>> = OnceLock::new();
    LARGE.get_or_init(|| common::mrc_bytes((NX, NX, LARGE_NZ), 10.0, 6))
}

/// The long tomogram's bytes: a header for 1260 x 1260 x [`LONG_NZ`] float32, then a pattern.
fn long_source() -> &'static Vec<u8> {
    static LONG: OnceLock<Vec<u8>> = OnceLock::new();
    LONG.get_or_init(|| {
        let mut bytes = common::mrc_bytes((NX, NX, 1), 10.0, 7)[..1024].to_vec();
        bytes[8..12].copy_from_slice(&(LONG_NZ as i32).to_le_bytes());
        bytes.extend((0..SECTION as usize * LONG_NZ).map(|i| (i % 251) as u8));
        bytes
    })
}

/// A read-only shared mapping of a file, as `numpy.memmap` and `mrcfile`'s mmap mode make.
struct Mapping {
    start: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn of(path: &Path) -> Mapping {
        use std::os::fd::AsRawFd;
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: a fresh mapping of `len` bytes of an open file, unmapped on drop.
        let start =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        assert_ne!(start, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Mapping { start, len }
    }

    /// Pages of the file the kernel's page cache holds.
    fn resident_pages(&self) -> usize {
        let mut resident = vec![0u8; self.len.div_ceil(4096)];
        // SAFETY: mincore writes one byte per page of the mapping into `resident`, which has that many.
        assert_eq!(unsafe { libc::mincore(self.start, self.len, resident.as_mut_ptr()) }, 0);
        resident.iter().filter(|page| *page & 1 == 1).count()
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes, readable, and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.start.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `of` mapped.
        unsafe { libc::munmap(self.start, self.len) };
    }
}

/// Whether the kernel maps files opened past the page cache (`FUSE_DIRECT_IO_ALLOW_MMAP`, Linux
/// 6.6 and later): without it, cdpfs keeps every file's pages (`--page-cache auto` is `always`),
/// and the tests of reads past the page cache say they are skipped.
fn kernel_maps_direct_io_files() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release.split(['.', '-']).map(|n| n.trim().parse::<u32>().unwrap_or(0));
    let maps = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (6, 6);
    if !maps {
        eprintln!("skipped: this kernel lacks FUSE_DIRECT_IO_ALLOW_MMAP (Linux 6.6+), so every open keeps pages");
    }
    maps
}

/// The tests count the shared server's traffic: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// (GETs, body bytes) the server has sent so far.
fn traffic() -> (u64, u64) {
    let server = &bucket().1;
    (server.gets.load(Ordering::SeqCst), server.bytes.load(Ordering::SeqCst))
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut file = File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf).unwrap() {
            0 => return out,
            n => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// The byte range of every object GET the server answered since the `first`th (`None`: the
/// whole object, no Range header).
fn served_since(first: usize) -> Vec<Option<std::ops::Range<u64>>> {
    served_of_since(first, "")
}

/// The end of the furthest range of `name` fetched since GET `first`.
fn furthest_since(first: usize, name: &str) -> u64 {
    served_of_since(first, name).into_iter().flatten().map(|r| r.end).max().unwrap_or(0)
}

/// [`furthest_since`], once it reaches `target` (read-ahead under way) or after 5 s.
fn furthest_fetched(first: usize, name: &str, target: u64) -> u64 {
    let started = Instant::now();
    while furthest_since(first, name) < target && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    furthest_since(first, name)
}

/// [`served_since`], of the GETs whose path contains `name`.
fn served_of_since(first: usize, name: &str) -> Vec<Option<std::ops::Range<u64>>> {
    let served = bucket().1.served.lock().unwrap();
    served[first..]
        .iter()
        .filter(|line| line.contains(name))
        .map(|line| {
            let (start, end) = line.rsplit_once("bytes=")?.1.split_once('-')?;
            Some(start.parse().ok()?..end.parse::<u64>().ok()? + 1)
        })
        .collect()
}

/// A counter of a running mount, from `cdpfs stats --json`.
/// The mount's count of blocks written to its cache dir, once it reaches `blocks` (or after 30 s).
fn wait_for_disk_writes(mount: &Mounted, blocks: u64) -> u64 {
    let started = Instant::now();
    while stat(mount, "cache_disk_writes") < blocks && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    stat(mount, "cache_disk_writes")
}

fn stat(mount: &Mounted, name: &str) -> u64 {
    let out = common::run_cdpfs(&["stats", "--json", mount.path.to_str().unwrap()], Duration::from_secs(10));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json[name].as_u64().unwrap_or_else(|| panic!("no {name} in {json}"))
}

#[test]
fn a_section_read_fetches_about_one_section_and_no_more() {
    let _serial = serial();
    let (source, server) = bucket();
    let mount = Mounted::on(server, "sections", &[]);
    let file = File::open(mount.join(KEY)).unwrap();
    let mut header = [0u8; 1024];
    file.read_exact_at(&mut header, 0).unwrap();
    assert_eq!(header[..], source[..1024]);
    let mut section = vec![0u8; SECTION as usize];
    for z in [5u64, 1, 7, 3] {
        let offset = 1024 + z * SECTION;
        let before = traffic();
        file.read_exact_at(&mut section, offset).unwrap();
        let (gets, bytes) = (traffic().0 - before.0, traffic().1 - before.1);
        assert!(section == source[offset as usize..(offset + SECTION) as usize], "section {z} differs");
        // Whole 512 KiB blocks around the section, and what the kernel reads ahead past it.
        assert!(bytes >= SECTION && bytes * 10 <= SECTION * 13, "section {z}: {bytes} bytes fetched for {SECTION}");
        assert!(gets >= 10, "section {z}: {gets} GETs: not fetched in parallel parts");
    }
}

#[test]
fn scrolling_through_sections_fetches_each_next_section_whole() {
    let _serial = serial();
    let (source, server) = bucket();
    let mount = Mounted::on(server, "scroll", &[]);
    let file = File::open(mount.join(KEY)).unwrap();
    let mut section = vec![0u8; SECTION as usize];
    file.read_exact_at(&mut section, 1024 + 2 * SECTION).unwrap();
    for z in [3u64, 4, 5] {
        let offset = 1024 + z * SECTION;
        let (first_get, before) = (server.served.lock().unwrap().len(), traffic());
        file.read_exact_at(&mut section, offset).unwrap();
        assert!(section == source[offset as usize..(offset + SECTION) as usize], "section {z} differs");
        let bytes = traffic().1 - before.1;
        assert!(bytes * 10 <= SECTION * 13, "section {z}: {bytes} bytes fetched for {SECTION}");
        // Fetched as a section (whole blocks, at once) from its second request on, not request
        // by request: the first request past a section may be the kernel's own read-ahead.
        let unaligned: Vec<_> = served_since(first_get)
            .into_iter()
            .filter(|range| range.as_ref().is_none_or(|r| !r.start.is_multiple_of(512 << 10)))
            .collect();
        assert!(unaligned.len() <= 1, "section {z} was read piecemeal: {unaligned:?}");
    }
}

#[test]
fn a_reader_that_goes_through_section_after_section_becomes_a_stream() {
    let _serial = serial();
    let (source, server) = bucket();
    let mount = Mounted::on(server, "mid-stream", &[]);
    let file = File::open(mount.join(KEY)).unwrap();
    // An HPC job's stripe: from the middle of section 1 to the end, 1 MiB at a time.
    let (first_get, before) = (server.served.lock().unwrap().len(), traffic());
    let mut offset = 1024 + SECTION + SECTION / 2;
    let mut buf = vec![0u8; 1 << 20];
    while offset < source.len() as u64 {
        let n = file.read_at(&mut buf, offset).unwrap();
        assert!(n > 0 && buf[..n] == source[offset as usize..offset as usize + n], "at {offset}");
        offset += n as u64;
    }
    let wanted = source.len() as u64 - (1024 + SECTION + SECTION / 2);
    let bytes = traffic().1 - before.1;
    assert!(bytes * 10 <= wanted * 11, "{bytes} bytes fetched for {wanted}");
    let large = served_since(first_get).into_iter().flatten().filter(|r| r.end - r.start >= 4 << 20).count();
    assert!(large >= 1, "still reading section by section after {} sections", NZ - 2);
}

#[test]
fn a_reader_going_from_the_header_into_the_data_past_the_first_section_reads_the_tomogram_through() {
    let _serial = serial();
    let (_, server) = bucket();
    let source = long_source();
    let mount = Mounted::on(server, "read-through", &[]);
    let file = File::open(mount.join(LONG_KEY)).unwrap();
    let first_get = server.served.lock().unwrap().len();
    // `mrcfile` reading a whole tomogram: its header, then the voxels from their start.
    let mut header = [0u8; 1024];
    file.read_exact_at(&mut header, 0).unwrap();
    let (mut offset, mut buf) = (1024, vec![0u8; 1 << 20]);
    while offset < 1024 + SECTION + (4 << 20) {
        let n = file.read_at(&mut buf, offset).unwrap();
        assert!(n > 0 && buf[..n] == source[offset as usize..offset as usize + n], "at {offset}");
        offset += n as u64;
    }
    // Past its first section: the rest of the file (less than the default read-ahead budget)
    // is asked for, not the 64 MiB a header read followed by one section starts.
    let name = LONG_KEY.rsplit('/').next().unwrap();
    let furthest = furthest_fetched(first_get, name, source.len() as u64);
    assert_eq!(furthest, source.len() as u64, "read-ahead stopped at {furthest} of {}", source.len());
}

#[test]
fn a_header_read_by_buffered_io_fetches_its_buffer_and_a_reader_going_on_from_it_streams() {
    if !kernel_maps_direct_io_files() {
        return;
    }
    let _serial = serial();
    let (_, server) = bucket();
    let source = long_source();
    let name = LONG_KEY.rsplit('/').next().unwrap();
    let mount = Mounted::on(server, "buffered-header", &[]);
    // `mrcfile.open(header_only=True)`, RELION or IMOD reading the header with stdio: one read
    // of the file's block size (1 MiB) into a buffer that does not start on a page (so the
    // kernel sends it as two requests), then close.
    let first_get = server.served.lock().unwrap().len();
    let mut buffer = vec![0u8; (1 << 20) + 16];
    let unaligned = &mut buffer[16..];
    let n = File::open(mount.join(LONG_KEY)).unwrap().read(unaligned).unwrap();
    assert!(n > 1024 && unaligned[..n] == source[..n]);
    common::quiet(server);
    let fetched: u64 = served_of_since(first_get, name).into_iter().flatten().map(|r| r.end - r.start).sum();
    assert!(fetched <= 2 << 20, "a header read fetched {fetched} bytes");
    // `dd bs=1M`, `cp`, `mrcfile.open()`: a second read going on from the first reads the
    // tomogram through: after 4 MiB the read-ahead asks for all of the rest (less than the
    // default read-ahead budget).
    let first_get = server.served.lock().unwrap().len();
    read_from_the_start(&mount.join(LONG_KEY), 1 << 20, 4, source);
    let furthest = furthest_fetched(first_get, name, source.len() as u64);
    assert_eq!(furthest, source.len() as u64, "read-ahead stopped at {furthest} of {}", source.len());
    // Past the page cache reads come as the program made them: reads smaller than a stdio
    // buffer (`dd bs=256k`) are a header read for the first only, and stream from the second
    // (through the page cache they would be the rest of a buffered read).
    let fresh = Mounted::on(server, "small-reads", &[]);
    let first_get = server.served.lock().unwrap().len();
    read_from_the_start(&fresh.join(LONG_KEY), 256 << 10, 2, source);
    let furthest = furthest_fetched(first_get, name, 32 << 20);
    assert!(furthest >= 32 << 20, "two reads of 256 KiB from the start fetched up to {furthest} only");
}

/// Reads `reads` reads of `len` bytes from the start of `path`, checking them against `source`.
fn read_from_the_start(path: &std::path::Path, len: usize, reads: usize, source: &[u8]) {
    let mut file = File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    for offset in (0..reads).map(|i| i * len) {
        file.read_exact(&mut buf).unwrap();
        assert!(buf[..] == source[offset..offset + len], "at {offset}");
    }
}

/// Through the page cache (`--page-cache always`, a workstation's mount) a buffered header read
/// comes as requests of the kernel's read-ahead size: 3dmod opening a tomogram at z = 0 (its
/// header through stdio's 1 MiB buffer, then the rest of the first section) starts a header
/// read's read-ahead (64 MiB), not the whole tomogram's.
#[test]
fn through_the_page_cache_a_header_and_the_first_section_read_ahead_no_more_than_a_header_read() {
    let _serial = serial();
    let (_, server) = bucket();
    let source = long_source();
    let name = LONG_KEY.rsplit('/').next().unwrap();
    let mount = Mounted::on(server, "paged-first-section", &["--page-cache", "always"]);
    let first_get = server.served.lock().unwrap().len();
    let file = File::open(mount.join(LONG_KEY)).unwrap();
    let mut buffer = vec![0u8; 1 << 20];
    file.read_exact_at(&mut buffer, 0).unwrap();
    let mut rest = vec![0u8; 1024 + SECTION as usize - buffer.len()];
    file.read_exact_at(&mut rest, buffer.len() as u64).unwrap();
    assert!(buffer[..] == source[..buffer.len()] && rest[..] == source[buffer.len()..1024 + SECTION as usize]);
    common::quiet(server);
    let furthest = furthest_since(first_get, name);
    assert!(furthest >= 32 << 20, "a header and the first section read ahead to {furthest} only");
    let limit = 1024 + SECTION + (80 << 20);
    assert!(furthest <= limit, "a header and the first section fetched up to {furthest} of {}", source.len());
}

#[test]
fn a_header_read_again_past_the_page_cache_takes_no_second_get() {
    let _serial = serial();
    let (source, server) = bucket();
    let mount = Mounted::on(server, "header-again", &[]);
    let before = traffic();
    // `header`, or mrcfile opening the tomogram, three times on a fresh mount (its first pass:
    // past the page cache): the header's bytes once, then from memory, a shorter read too.
    for len in [1024, 1024, 512] {
        let mut header = vec![0u8; len];
        File::open(mount.join(KEY)).unwrap().read_exact_at(&mut header, 0).unwrap();
        assert!(header == source[..len]);
    }
    let (gets, bytes) = (traffic().0 - before.0, traffic().1 - before.1);
    assert_eq!(gets, 1, "three header reads took {gets} GETs");
    assert!(bytes <= 64 << 10, "{bytes} bytes fetched for a 1 KiB header");
}

#[test]
fn small_random_reads_fetch_what_they_ask_for() {
    let _serial = serial();
    let (source, server) = bucket();
    let mount = Mounted::on(server, "random", &[]);
    let file = File::open(mount.join(KEY)).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let before = traffic();
    let reads = 40u64;
    for i in 0..reads {
        let offset = (i * 7_919_993 + 12_345) % (source.len() as u64 - buf.len() as u64);
        file.read_exact_at(&mut buf, offset).unwrap();
        assert!(buf == source[offset as usize..offset as usize + buf.len()], "read at {offset}");
    }
    let bytes = traffic().1 - before.1;
    // Page alignment adds at most 8 KiB to each 64 KiB read.
    assert!(bytes * 10 <= reads * (64 << 10) * 12, "{bytes} bytes fetched for {reads} reads of 64 KiB");
}

#[test]
fn a_stream_uses_part_sized_aligned_gets() {
    let _serial = serial();
    let (source, server) = bucket();
    let mount = Mounted::on(server, "stream", &[]);
    let (first_get, before) = (server.served.lock().unwrap().len(), traffic());
    assert!(read_all(&mount.join(KEY)) == *source);
    let bytes = traffic().1 - before.1;
    // Each byte once, but for the first small read the kernel makes from the start.
    assert!(bytes <= source.len() as u64 + (64 << 10), "{bytes} bytes fetched for a stream of {}", source.len());
    let part = cdpfs::cache::PART_SIZE;
    let ranges: Vec<_> = served_since(first_get).into_iter().flatten().collect();
    let in_parts: u64 =
        ranges.iter().filter(|r| r.end - r.start == part && r.start % part == 0).map(|r| r.end - r.start).sum();
    assert!(in_parts * 10 >= source.len() as u64 * 6, "only {in_parts} bytes came in aligned 8 MiB GETs: {ranges:?}");
}

#[test]
fn a_slow_cache_dir_drops_writes_and_neither_slows_reads_nor_grows_memory() {
    let _serial = serial();
    let (source, server) = bucket();
    let plain = Mounted::on(server, "no-disk", &["--no-disk-cache", "--max-memory", "48M"]);
    let started = Instant::now();
    assert!(read_all(&plain.join(KEY)) == *source);
    let without_disk = started.elapsed();
    drop(plain);

    let slow = SlowMount::new(&common::scratch_dir("slow-cache"));
    // Each write request of the cache dir takes 100 ms: a few MB/s at most.
    slow.controls.write_delay_ms.store(100, Ordering::SeqCst);
    let cache = slow.path.to_str().unwrap();
    let mount = Mounted::on(server, "slow-disk", &["--cache-dir", cache, "--max-memory", "48M"]);
    let idle = common::process_memory(&mount.path, "VmRSS:");
    let started = Instant::now();
    assert!(read_all(&mount.join(KEY)) == *source);
    let with_slow_disk = started.elapsed();
    let growth = common::process_memory(&mount.path, "VmHWM:").saturating_sub(idle);
    assert!(stat(&mount, "cache_disk_writes_dropped") > 0, "a full write queue must drop blocks");
    assert!(
        with_slow_disk <= without_disk * 3 / 2 + Duration::from_secs(1),
        "a slow cache dir slowed the read: {with_slow_disk:?} vs {without_disk:?} without a disk cache"
    );
    assert!(growth <= (48 << 20) * 11 / 10, "memory grew by {} MiB under --max-memory 48M", growth >> 20);
    slow.controls.write_delay_ms.store(0, Ordering::SeqCst);
}

#[test]
fn a_cache_dir_without_direct_io_is_written_through_the_page_cache() {
    let _serial = serial();
    let (source, server) = bucket();
    let slow = SlowMount::new(&common::scratch_dir("no-direct-cache"));
    slow.controls.refuse_direct.store(true, Ordering::SeqCst);
    let cache = slow.path.to_str().unwrap();
    let blocks = (source.len() as u64).div_ceil(512 << 10);
    {
        let mount = Mounted::on(server, "no-direct-1", &["--cache-dir", cache]);
        assert!(read_all(&mount.join(KEY)) == *source);
        assert_eq!(wait_for_disk_writes(&mount, blocks), blocks);
    }
    assert!(slow.controls.refused_direct.load(Ordering::SeqCst) >= 1, "cdpfs never asked for O_DIRECT");
    let mount = Mounted::on(server, "no-direct-2", &["--cache-dir", cache]);
    let before = traffic();
    assert!(read_all(&mount.join(KEY)) == *source);
    assert_eq!(traffic().0 - before.0, 0, "the blocks written without O_DIRECT were not read back");
}

#[test]
fn a_hung_cache_dir_costs_one_timeout_not_a_stall() {
    let _serial = serial();
    let (source, server) = bucket();
    let slow = SlowMount::new(&common::scratch_dir("hung-cache"));
    let cache = slow.path.to_str().unwrap();
    {
        let mount = Mounted::on(server, "hung-1", &["--cache-dir", cache]);
        assert!(read_all(&mount.join(KEY)) == *source);
        let blocks = (source.len() as u64).div_ceil(512 << 10);
        assert_eq!(wait_for_disk_writes(&mount, blocks), blocks);
    }
    // The cache dir still lists and stats, but opening or reading a file never returns.
    slow.controls.hang_reads.store(true, Ordering::SeqCst);
    let mount = Mounted::on(server, "hung-2", &["--cache-dir", cache]);
    let before = traffic();
    let started = Instant::now();
    assert!(read_all(&mount.join(KEY)) == *source);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(8), "a hung cache dir stalled the read for {elapsed:?}");
    assert!(stat(&mount, "cache_disk_read_timeouts") >= 1);
    assert!(traffic().1 - before.1 >= source.len() as u64 / 2, "the blocks came from S3");
    slow.controls.hang_reads.store(false, Ordering::SeqCst);
}

#[test]
fn a_large_files_first_pass_bypasses_the_page_cache_and_later_reads_keep_it() {
    if !kernel_maps_direct_io_files() {
        return;
    }
    let _serial = serial();
    let server = &bucket().1;
    let source = large_source();
    let pages = source.len().div_ceil(4096);
    // No disk tier: the second read fetches everything again, which shows how.
    let mount = Mounted::on(server, "first-pass", &["--no-disk-cache"]);
    let path = mount.join(LARGE_KEY);
    let before = traffic();
    assert!(read_all(&path) == *source);
    let (first_gets, fetched) = (traffic().0 - before.0, traffic().1 - before.1);
    assert!(fetched <= source.len() as u64 + (64 << 10), "{fetched} bytes fetched for a stream of {}", source.len());
    let resident = Mapping::of(&path).resident_pages();
    assert!(resident * 100 <= pages, "the first pass left {resident} of {pages} pages in the page cache");
    // So does a smaller file's of one S3 part or more (a 50 MB tomogram, a large Zarr chunk).
    let (smaller, source_of_smaller) = (mount.join(KEY), &bucket().0);
    assert!(read_all(&smaller) == *source_of_smaller);
    let (resident, of) = (Mapping::of(&smaller).resident_pages(), source_of_smaller.len().div_ceil(4096));
    assert!(resident * 100 <= of, "the first pass of a 50 MB file left {resident} of {of} pages");
    // Read through once: the next open keeps its pages (a stream again, with read-ahead: the
    // page cache holds nothing of the first pass), and the one after reads none again.
    let before = traffic();
    assert!(read_all(&path) == *source);
    let second_gets = traffic().0 - before.0;
    assert!(second_gets <= first_gets + 2, "the second read took {second_gets} GETs, the first {first_gets}");
    let resident = Mapping::of(&path).resident_pages();
    assert!(resident * 10 >= pages * 9, "a re-read left only {resident} of {pages} pages in the page cache");
    // The third read asks S3 at most for what the page cache lacks (usually nothing; on a busy
    // machine a few pages of the re-read may be missing), not for the file again.
    let before = traffic();
    assert!(read_all(&path) == *source);
    let (third_gets, missing) = (traffic().0 - before.0, (pages - resident) as u64);
    assert!(third_gets <= missing, "a third read took {third_gets} GETs with {missing} pages not in the page cache");

    // --page-cache always: the first pass keeps its pages too.
    let always = Mounted::on(server, "first-pass-always", &["--page-cache", "always"]);
    assert!(read_all(&always.join(LARGE_KEY)) == *source);
    let resident = Mapping::of(&always.join(LARGE_KEY)).resident_pages();
    assert!(resident * 10 >= pages * 9, "--page-cache always left only {resident} of {pages} pages");
}

#[test]
fn a_large_file_mapped_before_its_first_pass_reads_right() {
    let _serial = serial();
    let server = &bucket().1;
    let source = large_source();
    let mount = Mounted::on(server, "mapped", &[]);
    // Mapped shared while its opens bypass the page cache (mrcfile.mmap on a fresh mount).
    let mapping = Mapping::of(&mount.join(LARGE_KEY));
    let (header, last) = (&mapping.bytes()[..1024], source.len() - (1 << 20));
    assert_eq!(header, &source[..1024]);
    assert!(mapping.bytes()[last..] == source[last..], "the mapping's last MiB differs");
    assert!(mapping.bytes() == &source[..], "the mapping differs from the object");
}

#[test]
fn reads_past_the_page_cache_that_span_blocks_get_their_bytes() {
    let _serial = serial();
    let server = &bucket().1;
    let source = large_source();
    let mount = Mounted::on(server, "spanning", &["--no-disk-cache"]);
    let file = File::open(mount.join(LARGE_KEY)).unwrap();
    // A header read, then unaligned reads of up to 1 MiB + 64 KiB that span two or three
    // 512 KiB blocks (each one FUSE request past the page cache, replied to in slices), some
    // ending at the object's end.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        state >> 17
    };
    let mut reads = vec![(0, 1024), (1024, 1 << 20), (source.len() as u64 - 700_000, 700_000)];
    reads.extend((0..60).map(|_| {
        let len = 1 + next() % (1 << 20) + (64 << 10);
        (next() % (source.len() as u64 - len), len)
    }));
    for (offset, len) in reads {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset).unwrap();
        let at = offset as usize;
        assert!(buf == source[at..at + len as usize], "{len} bytes at {offset} differ from the object");
    }
}

/// The chunks of the Zarr levels the server has sent bytes of since its `first`th GET, in order.
fn chunks_served_since(first: usize) -> Vec<String> {
    let served = bucket().1.served.lock().unwrap();
    let chunk = |line: &str| {
        let path = line.split_once(ZARR_LEVEL).or_else(|| line.split_once(FLAT_LEVEL))?.1;
        Some(path.split_once(' ').map_or(path, |(path, _)| path).to_owned())
    };
    served[first..].iter().filter_map(|line| chunk(line)).collect()
}

/// Fails unless the server sends bytes of `chunk` (after its `first`th GET) within 10 s: the
/// chunk was fetched before any reader opened it.
fn assert_fetched_ahead(first: usize, chunk: &str) {
    let started = Instant::now();
    while !chunks_served_since(first).iter().any(|c| c == chunk) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{chunk} was not fetched ahead: {:?}",
            chunks_served_since(first)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads chunk `path` of the test levels through `mount` and checks its bytes.
fn read_chunk(mount: &Mounted, path: &str) {
    let (key, bytes) = chunk_source(path);
    assert!(read_all(&mount.join(&key)) == bytes, "{key}");
}

/// A fresh mount called `name` for a chunk read-ahead test (holding the traffic lock), and the
/// server's GETs and body bytes so far.
fn chunk_test_mount(name: &str) -> (MutexGuard<'static, ()>, Mounted, usize, u64) {
    let serial = serial();
    let server = &bucket().1;
    let mount = Mounted::on(server, name, &[]);
    let (first, bytes) = (server.served.lock().unwrap().len(), traffic().1);
    (serial, mount, first, bytes)
}

/// The distinct chunks the server has sent bytes of since its `first`th GET, sorted.
fn distinct_chunks_served_since(first: usize) -> Vec<String> {
    let mut chunks = chunks_served_since(first);
    chunks.sort();
    chunks.dedup();
    chunks
}

/// Reads chunk `path` (fetched ahead) and checks that that took no GET of it.
fn read_chunk_fetched_ahead(mount: &Mounted, path: &str) {
    let before = bucket().1.served.lock().unwrap().len();
    read_chunk(mount, path);
    assert!(!chunks_served_since(before).iter().any(|c| c == path), "{path} was fetched twice");
}

#[test]
fn a_reader_going_along_a_zarr_levels_rows_gets_the_next_chunk_fetched_ahead() {
    let (_serial, mount, first, bytes) = chunk_test_mount("chunk-rows");
    // One chunk read is no sweep: nothing else is fetched.
    read_chunk(&mount, "0/0/1");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(distinct_chunks_served_since(first), ["0/0/1"]);
    // A second along the row: the next in C order (the next row's first, here) comes before
    // anyone opens it, and is then read from memory.
    read_chunk(&mount, "0/0/2");
    assert_fetched_ahead(first, "0/1/0");
    read_chunk_fetched_ahead(&mount, "0/1/0");
    assert_fetched_ahead(first, "0/1/1");
    std::thread::sleep(Duration::from_millis(300));
    let chunks = distinct_chunks_served_since(first);
    // The reader stopped: one chunk fetched ahead for nothing, no more.
    assert_eq!(chunks, ["0/0/1", "0/0/2", "0/1/0", "0/1/1"]);
    assert_eq!(stat(&mount, "zarr_chunks_fetched_ahead"), 2);
    assert_eq!(traffic().1 - bytes, 4 * ZARR_CHUNK as u64, "each chunk's bytes once");
}

#[test]
fn a_reader_going_down_a_column_of_zarr_chunks_gets_the_chunk_one_step_on() {
    let (_serial, mount, first, bytes) = chunk_test_mount("chunk-column");
    read_chunk(&mount, "1/0/2");
    read_chunk(&mount, "1/1/2");
    // Down y with z and x kept: the chunk one more step on, not the next one in its row.
    assert_fetched_ahead(first, "1/2/2");
    read_chunk_fetched_ahead(&mount, "1/2/2");
    // One more step is off the grid: nothing is fetched.
    std::thread::sleep(Duration::from_millis(500));
    let chunks = distinct_chunks_served_since(first);
    assert_eq!(chunks, ["1/0/2", "1/1/2", "1/2/2"]);
    assert_eq!(traffic().1 - bytes, 3 * ZARR_CHUNK as u64, "each chunk's bytes once");
}

#[test]
fn small_chunks_with_flat_keys_are_fetched_ahead_in_the_order_of_their_numbers() {
    let (_serial, mount, first, bytes) = chunk_test_mount("chunk-flat");
    read_chunk(&mount, "0.0.8");
    read_chunk(&mount, "0.0.9");
    // By name, 0.0.10 sorts before 0.0.8 and nothing follows 0.0.9; by number 0.0.10 is next.
    assert_fetched_ahead(first, "0.0.10");
    read_chunk_fetched_ahead(&mount, "0.0.10");
    assert_fetched_ahead(first, "0.0.11");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(distinct_chunks_served_since(first), ["0.0.10", "0.0.11", "0.0.8", "0.0.9"]);
    assert_eq!(traffic().1 - bytes, 4 * FLAT_CHUNK as u64, "each chunk's bytes once");
}
