//! Write-behind stage of the disk tier: blocks are handed to a few writer threads through a
//! queue bounded in bytes, so writing the cache never slows a read.
//!
//! A block that arrives when the queue is full is not written (and counted): the reader has
//! its bytes already, and the disk tier is a cache. The writers run at idle CPU priority
//! (`SCHED_IDLE`), so on a busy node they take only the CPU nothing else wants, and the
//! queued bytes are part of the mount's memory budget. When the stage is dropped (the mount
//! ends) the blocks still queued are let go and the writes in progress are waited for, for a
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
}

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
    loop {
        let job = jobs.lock().expect("write queue poisoned").recv();
        let Ok((key, data)) = job else { return };
        let outcome = match closing.load(Ordering::Acquire) {
            true => &counters.dropped,
            false if disk.write(&key, &data) => &counters.written,
            false => &counters.refused,
        };
        outcome.fetch_add(1, Ordering::Relaxed);
        counters.queued_bytes.fetch_sub(data.len() as u64, Ordering::AcqRel);
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
