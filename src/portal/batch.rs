//! Id lookups batched: lookups of one kind that arrive within `WINDOW` (20 ms) of each other go to the
//! API as one `_in` query (up to `MAX_BATCH` ids), so a script resolving many ids at once
//! costs a few requests, not one each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::api::{ApiError, PortalApi};
use super::ids::{Kind, PortalId};

/// How long the first lookup of a batch waits for others.
const WINDOW: Duration = Duration::from_millis(20);
/// Most ids in one query.
const MAX_BATCH: usize = 100;

type Waiter = oneshot::Sender<Result<Option<String>, ApiError>>;
/// Lookups waiting for their batch, by kind.
type Queues = Arc<Mutex<HashMap<Kind, Vec<(i32, Waiter)>>>>;

/// Gathers id lookups into batches.
pub struct Batcher {
    api: Arc<PortalApi>,
    pending: Queues,
}

impl Batcher {
    /// Batches lookups to `api`.
    pub fn new(api: Arc<PortalApi>) -> Batcher {
        Batcher { api, pending: Arc::default() }
    }

    /// The key `id` stands for, `None` when the portal does not know it.
    pub async fn locate(&self, id: PortalId) -> Result<Option<String>, ApiError> {
        let (tx, rx) = oneshot::channel();
        let leads = {
            let mut pending = self.pending.lock().expect("batch queue poisoned");
            let queue = pending.entry(id.kind).or_default();
            queue.push((id.number, tx));
            queue.len() == 1
        };
        if leads {
            // The batch is sent by a task of its own, so that it goes out (and answers every
            // waiter) even if this lookup is abandoned.
            let (api, pending, kind) = (self.api.clone(), self.pending.clone(), id.kind);
            tokio::spawn(async move {
                tokio::time::sleep(WINDOW).await;
                let mut batch = pending.lock().expect("batch queue poisoned").remove(&kind).unwrap_or_default();
                while !batch.is_empty() {
                    let part: Vec<(i32, Waiter)> = batch.drain(..batch.len().min(MAX_BATCH)).collect();
                    let mut ids: Vec<i32> = part.iter().map(|(number, _)| *number).collect();
                    ids.sort_unstable();
                    ids.dedup();
                    let answer = api.locate(kind, &ids).await;
                    for (number, waiter) in part {
                        let _ =
                            waiter.send(answer.as_ref().map(|found| found.get(&number).cloned()).map_err(Clone::clone));
                    }
                }
            });
        }
        rx.await.unwrap_or_else(|_| Err(ApiError::Garbled("the batch was dropped".into())))
    }
}
