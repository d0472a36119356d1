//! Write-behind stage of the disk tier: blocks are handed to a few writer threads through a
//! queue bounded in bytes, so writing the cache never slows a read.
//!
//! A block that arrives when the queue is full is not written (and counted): the reader has
//! its bytes already, and the disk tier is a cache. The writers run at idle CPU priority
//! (`SCHED_IDLE`), so on a busy node they take only the CPU nothing else wants, and the
//! queued bytes are part of the mount's memory budget.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::disk::DiskCache;
use super::BlockKey;

/// Counters of the write-behind stage.
#[derive(Debug, Default)]
pub struct WriteCounters {
    /// Blocks written to the cache directory.
    pub written: AtomicU64,
    /// Blocks not written because the queue was full (or the directory refused them).
    pub dropped: AtomicU64,
    /// Bytes waiting in the queue now.
    pub queued_bytes: AtomicU64,
}

/// The queue and its writer threads. Dropping it lets the writers finish the queue and exit.
pub struct WriteBehind {
    queue: Mutex<Sender<(BlockKey, Bytes)>>,
    limit: u64,
    counters: Arc<WriteCounters>,
}

impl WriteBehind {
    /// Starts `writers` threads writing into `disk`, with at most `limit` bytes queued.
    pub fn start(disk: Arc<DiskCache>, limit: u64, writers: usize) -> WriteBehind {
        let (queue, jobs) = channel::<(BlockKey, Bytes)>();
        let jobs = Arc::new(Mutex::new(jobs));
        let counters = Arc::new(WriteCounters::default());
        for n in 0..writers.max(1) {
            let (disk, jobs, counters) = (disk.clone(), jobs.clone(), counters.clone());
            std::thread::Builder::new()
                .name(format!("cdpfs-disk-{n}"))
                .spawn(move || write_loop(&disk, &jobs, &counters))
                .expect("starting a disk writer thread");
        }
        WriteBehind { queue: Mutex::new(queue), limit, counters }
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
        if self.queue.lock().expect("write queue poisoned").send((key, data)).is_err() {
            queued.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        true
    }
}

fn write_loop(disk: &DiskCache, jobs: &Mutex<Receiver<(BlockKey, Bytes)>>, counters: &WriteCounters) {
    lower_priority();
    loop {
        let job = jobs.lock().expect("write queue poisoned").recv();
        let Ok((key, data)) = job else { return };
        let outcome = if disk.write(&key, &data) { &counters.written } else { &counters.dropped };
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
}
