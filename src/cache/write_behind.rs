//! Write-behind stage of the disk tier: blocks are handed to a few writer threads through a
//! queue bounded in bytes, so writing the cache never slows a read.
//!
//! A block that arrives when the queue is full is not written (and counted): the reader has
//! its bytes already, and the disk tier is a cache. The writers run at idle CPU priority
//! (`SCHED_IDLE`) and pause while their blocks wait for a CPU much longer than they run
//! (`Pacing`), so on a busy node they take only the CPU nothing else wants; the queued
//! bytes are part of the mount's memory budget. When the stage is dropped (the mount ends)
//! the blocks still queued are let go and the writes in progress are waited for, for a
//! while, so that the process does not exit in the middle of one and leave its temp file.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::disk::DiskCache;
use super::BlockKey;

/// Counters of the write-behind stage.
#[derive(Debug, Default)]
pub struct WriteCounters {
    /// Blocks written to the cache directory.
    pub written: AtomicU64,
    /// Blocks not written because the queue was full (or the mount was ending).
    pub dropped: AtomicU64,
    /// Blocks the cache directory did not take (full, read-only, failing, paused after that).
    pub refused: AtomicU64,
    /// Bytes waiting in the queue now.
    pub queued_bytes: AtomicU64,
    /// Pauses the writers took because the CPU was busy with other work (see `Pacing`).
    pub paused: AtomicU64,
}

/// A writer pauses while its blocks wait for a CPU on average more than this many times as
/// long as they run...
const BUSY_WAIT_PER_RUN: f64 = 3.0;
/// ...for this many times as long as its last block took from waking it to done (so it is
/// idle 19 twentieths of the time while the CPU stays busy)...
const PAUSE_PER_BLOCK_TIME: u32 = 19;
/// ...but never longer than this.
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// How long dropping the stage waits for the writes in progress (a hung cache directory must
/// not hang the end of a mount).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The queue and its writer threads. Dropping it lets go of what is queued and waits for the
/// writes in progress.
pub struct WriteBehind {
    queue: Mutex<Option<Sender<(BlockKey, Bytes)>>>,
    limit: u64,
    counters: Arc<WriteCounters>,
    /// Set when the stage is dropped: writers count what is left as not written.
    closing: Arc<AtomicBool>,
    writers: Vec<JoinHandle<()>>,
}

impl WriteBehind {
    /// Starts `writers` threads writing into `disk`, with at most `limit` bytes queued.
    pub fn start(disk: Arc<DiskCache>, limit: u64, writers: usize) -> WriteBehind {
        let (queue, jobs) = channel::<(BlockKey, Bytes)>();
        let jobs = Arc::new(Mutex::new(jobs));
        let counters = Arc::new(WriteCounters::default());
        let closing = Arc::new(AtomicBool::new(false));
        let writers = (0..writers.max(1))
            .map(|n| {
                let (disk, jobs, counters, closing) = (disk.clone(), jobs.clone(), counters.clone(), closing.clone());
                std::thread::Builder::new()
                    .name(format!("cdpfs-disk-{n}"))
                    .spawn(move || write_loop(&disk, &jobs, &counters, &closing))
                    .expect("starting a disk writer thread")
            })
            .collect();
        WriteBehind { queue: Mutex::new(Some(queue)), limit, counters, closing, writers }
    }

    /// The stage's counters.
    pub fn counters(&self) -> &WriteCounters {
        &self.counters
    }

    /// Queues `data` to be written as block `key`; false (and counted) when the queue is full.
    pub fn submit(&self, key: BlockKey, data: Bytes) -> bool {
        let len = data.len() as u64;
        let queued = &self.counters.queued_bytes;
        let reserved =
            queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| (q + len <= self.limit).then_some(q + len));
        if reserved.is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let queue = self.queue.lock().expect("write queue poisoned");
        if queue.as_ref().is_none_or(|queue| queue.send((key, data)).is_err()) {
            queued.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        true
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Release);
        // No more jobs: the writers return once the queue is empty.
        self.queue.get_mut().map(Option::take).ok();
        let started = Instant::now();
        while !self.writers.iter().all(JoinHandle::is_finished) && started.elapsed() < CLOSE_WAIT {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn write_loop(
    disk: &DiskCache,
    jobs: &Mutex<Receiver<(BlockKey, Bytes)>>,
    counters: &WriteCounters,
    closing: &AtomicBool,
) {
    lower_priority();
    let clock = ThreadSchedClock::open();
    let mut pacing = Pacing::default();
    // Since the last block was done: the wait for a CPU after the queue woke this writer counts.
    let mut since = clock.times();
    loop {
        let job = jobs.lock().expect("write queue poisoned").recv();
        let Ok((key, data)) = job else { return };
        let woken = Instant::now();
        let outcome = match closing.load(Ordering::Acquire) {
            true => &counters.dropped,
            false if disk.write(&key, &data) => &counters.written,
            false => &counters.refused,
        };
        outcome.fetch_add(1, Ordering::Relaxed);
        counters.queued_bytes.fetch_sub(data.len() as u64, Ordering::AcqRel);
        let done = clock.times();
        let pause = since.zip(done).and_then(|((ran, waited), (run, wait))| {
            pacing.after_block(run.saturating_sub(ran), wait.saturating_sub(waited), woken.elapsed())
        });
        since = match pause.filter(|_| !closing.load(Ordering::Acquire)) {
            Some(pause) => {
                counters.paused.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(pause);
                clock.times()
            }
            None => done,
        };
    }
}

/// When a writer pauses. Idle priority alone does not keep the writers out of the reads' way:
/// a kernel that does not preempt system calls (the default `PREEMPT_NONE`) lets a writer
/// finish a block file's creation and `O_DIRECT` write (about 0.2 ms of kernel time) before a
/// read woken on its CPU runs, so on a 2-core machine reading 1.3-1.5 GB/s a cold read with
/// the disk tier on took 0.78-0.88x the time of one without, although the writers used only
/// a tenth of the CPU. A writer whose blocks wait for a CPU much longer than they run shares
/// a busy CPU: it pauses after each block for several times what the block took, and the
/// blocks that arrive meanwhile are not written (the queue is full). Where the network, not
/// the CPU, is the limit, the writers wait little and write every block.
#[derive(Debug, Default)]
struct Pacing {
    /// Moving averages of a block's nanoseconds on a CPU and waiting for one.
    run: f64,
    wait: f64,
}

impl Pacing {
    /// Takes in a block that ran `run` ns and waited `wait` ns for a CPU, `took` from the
    /// writer's waking to done; the pause to take after it, if any.
    fn after_block(&mut self, run: u64, wait: u64, took: Duration) -> Option<Duration> {
        /// The weight of the last block in the averages.
        const WEIGHT: f64 = 1.0 / 8.0;
        self.run += (run as f64 - self.run) * WEIGHT;
        self.wait += (wait as f64 - self.wait) * WEIGHT;
        (self.wait > self.run * BUSY_WAIT_PER_RUN).then(|| (took * PAUSE_PER_BLOCK_TIME).min(MAX_PAUSE))
    }
}

/// The calling thread's CPU time and time spent waiting for a CPU, from the kernel's scheduler
/// statistics (`/proc/thread-self/schedstat`: opened by the thread, it stays that thread's).
/// None where the kernel keeps none: writers then never pause.
struct ThreadSchedClock(Option<std::fs::File>);

impl ThreadSchedClock {
    fn open() -> ThreadSchedClock {
        ThreadSchedClock(std::fs::File::open("/proc/thread-self/schedstat").ok())
    }

    /// Nanoseconds on a CPU and waiting for one, so far.
    fn times(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::FileExt;
        let mut line = [0u8; 128];
        let len = self.0.as_ref()?.read_at(&mut line, 0).ok()?;
        let mut fields = std::str::from_utf8(&line[..len]).ok()?.split_whitespace().map(str::parse::<u64>);
        Some((fields.next()?.ok()?, fields.next()?.ok()?))
    }
}

/// Moves the calling thread to the idle scheduling class (Linux; best effort).
fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param; pid 0 is the calling thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ObjectMeta;
    use std::time::{Duration, SystemTime};

    fn key(index: u64) -> BlockKey {
        let object = ObjectMeta { key: "k".into(), size: 1 << 30, etag: "\"e\"".into(), mtime: SystemTime::UNIX_EPOCH };
        BlockKey { object: Arc::new(object), index }
    }

    #[test]
    fn blocks_beyond_the_queue_bound_are_dropped_and_the_rest_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(DiskCache::open(dir.path(), Some(1 << 30), 1 << 16).unwrap());
        let stage = WriteBehind::start(disk.clone(), 3 * 4096, 2);
        // More than the whole queue may hold: never queued, whatever the writers are doing.
        assert!(!stage.submit(key(0), Bytes::from(vec![1u8; 4 * 4096])));
        for i in 1..4 {
            assert!(stage.submit(key(i), Bytes::from(vec![i as u8; 4096])));
            assert!(stage.counters.queued_bytes.load(Ordering::Acquire) <= 3 * 4096);
        }
        for _ in 0..500 {
            if stage.counters.written.load(Ordering::Relaxed) == 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(stage.counters.written.load(Ordering::Relaxed), 3);
        assert_eq!(stage.counters.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(stage.counters.queued_bytes.load(Ordering::Acquire), 0);
        assert!(disk.read(&key(0)).is_none());
        for i in 1..4 {
            assert_eq!(disk.read(&key(i)).unwrap(), vec![i as u8; 4096]);
        }
    }

    #[test]
    fn dropping_the_stage_lets_the_queue_go_and_waits_for_the_writes_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(DiskCache::open(dir.path(), Some(1 << 30), 1 << 16).unwrap());
        let stage = WriteBehind::start(disk, 1 << 30, 2);
        for i in 0..200 {
            assert!(stage.submit(key(i), Bytes::from(vec![i as u8; 1 << 16])));
        }
        let counters = stage.counters.clone();
        drop(stage);
        // Every block is written or let go by now, and no writer is in the middle of one.
        let (written, dropped) = (counters.written.load(Ordering::Relaxed), counters.dropped.load(Ordering::Relaxed));
        assert_eq!(written + dropped, 200, "{written} written, {dropped} let go");
        assert_eq!(counters.queued_bytes.load(Ordering::Acquire), 0);
        let temps: Vec<_> = walk(dir.path()).into_iter().filter(|name| name.starts_with('.')).collect();
        assert!(temps.is_empty(), "temp files left: {temps:?}");
    }

    #[test]
    fn a_writer_pauses_while_its_blocks_wait_for_the_cpu_much_longer_than_they_run_and_not_otherwise() {
        let block = Duration::from_micros(300);
        let mut pacing = Pacing::default();
        // Where the network is the limit: blocks wait about as long as they run.
        for _ in 0..100 {
            assert_eq!(pacing.after_block(200_000, 300_000, block), None);
        }
        // A busy CPU: after a few such blocks the average says so, and the writer pauses 19
        // times what a block took...
        let first_pause = (0..8).find(|_| pacing.after_block(200_000, 2_000_000, block).is_some());
        assert!(first_pause.is_some_and(|n| n > 0), "one slow block alone is not a busy CPU: {first_pause:?}");
        assert_eq!(pacing.after_block(200_000, 2_000_000, block), Some(block * PAUSE_PER_BLOCK_TIME));
        // ...but not for ages when the CPU is very busy.
        assert_eq!(pacing.after_block(200_000, 2_000_000, Duration::from_secs(1)), Some(MAX_PAUSE));
        // The CPU free again: the pauses stop within some blocks.
        let resumed = (0..40).find(|_| pacing.after_block(200_000, 100_000, block).is_none());
        assert!(resumed.is_some(), "still pausing");
    }

    #[test]
    fn writers_pause_on_a_cpu_that_other_threads_keep_busy_and_still_write_every_block_they_took() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(DiskCache::open(dir.path(), Some(1 << 30), 1 << 16).unwrap());
        let stage = WriteBehind::start(disk.clone(), 1 << 30, 2);
        // A thread per CPU at normal priority that never sleeps: the writers (idle priority)
        // wait for a CPU far longer than they run.
        let (stop, spinning) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let cpus = std::thread::available_parallelism().map_or(2, usize::from);
        let spinners: Vec<_> = (0..cpus)
            .map(|_| {
                let (stop, spinning) = (stop.clone(), spinning.clone());
                std::thread::spawn(move || {
                    spinning.fetch_add(1, Ordering::SeqCst);
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        // Every CPU busy before the first block is queued (else the writers may write them all
        // while the spinners are still starting).
        while spinning.load(Ordering::SeqCst) < cpus as u64 {
            std::thread::yield_now();
        }
        // Blocks arrive one by one, as from a stream, until a writer has paused (a burst of
        // blocks can be written within one time slice a writer got, never waiting between them).
        let block = |i: u64| vec![i as u8; 16 << 10];
        let counters = stage.counters.clone();
        let started = Instant::now();
        let (paused, written) =
            (|| counters.paused.load(Ordering::Relaxed), || counters.written.load(Ordering::Relaxed));
        let mut blocks = 0;
        while paused() == 0 && started.elapsed() < Duration::from_secs(60) {
            assert!(stage.submit(key(blocks), Bytes::from(block(blocks))));
            blocks += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        spinners.into_iter().for_each(|spinner| spinner.join().unwrap());
        assert!(paused() > 0, "the writers never paused for the busy CPU: {counters:?}");
        while written() < blocks && started.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(written(), blocks, "{counters:?}");
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 0);
        for i in 0..blocks {
            assert_eq!(disk.read(&key(i)).unwrap(), block(i));
        }
    }

    /// Names of the files under `dir`.
    fn walk(dir: &std::path::Path) -> Vec<String> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            match entry.file_type().unwrap().is_dir() {
                true => names.extend(walk(&entry.path())),
                false => names.push(entry.file_name().to_string_lossy().into_owned()),
            }
        }
        names
    }
}
