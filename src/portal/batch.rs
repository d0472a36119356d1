//! Lookups batched: lookups of one group (the ids of one kind; the keys of one kind of object in
//! one field) that arrive within `WINDOW` (20 ms) of each other go to the API as one `_in` query
//! (up to `MAX_BATCH` values), so a script resolving many ids, or reading the ids of many
//! folders, at once costs a few requests, not one each.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::api::{ApiError, PortalApi};
use super::ids::Kind;

/// How long the first lookup of a batch waits for others.
const WINDOW: Duration = Duration::from_millis(20);
/// Most values in one query.
const MAX_BATCH: usize = 100;

/// A question the API answers for many values of one group in one query.
pub trait Question: Send + Sync + 'static {
    /// What the values of one query share.
    type Group: Eq + Hash + Clone + Send + Sync + 'static;
    /// What is asked about.
    type Value: Eq + Hash + Ord + Clone + Send + Sync + 'static;
    /// The answer for one value.
    type Answer: Clone + Send + 'static;
    /// The answers for `values` (a value the portal knows nothing of is missing).
    fn ask(
        api: &PortalApi,
        group: &Self::Group,
        values: &[Self::Value],
    ) -> impl Future<Output = Result<HashMap<Self::Value, Self::Answer>, ApiError>> + Send;
}

/// Ids of one kind to the keys they stand for ([`PortalApi::locate`]).
pub struct Locate;

impl Question for Locate {
    type Group = Kind;
    type Value = i32;
    type Answer = String;
    fn ask(
        api: &PortalApi,
        kind: &Kind,
        ids: &[i32],
    ) -> impl Future<Output = Result<HashMap<i32, String>, ApiError>> + Send {
        api.locate(*kind, ids)
    }
}

/// `s3://` URLs held in one field of one kind of object to the objects' ids
/// ([`PortalApi::identify`]).
pub struct Identify;

impl Question for Identify {
    type Group = (Kind, &'static str);
    type Value = String;
    type Answer = i32;
    fn ask(
        api: &PortalApi,
        (kind, path): &(Kind, &'static str),
        urls: &[String],
    ) -> impl Future<Output = Result<HashMap<String, i32>, ApiError>> + Send {
        api.identify(*kind, path, urls)
    }
}

type Waiter<Q> = oneshot::Sender<Result<Option<<Q as Question>::Answer>, ApiError>>;
/// Lookups waiting for their batch, by group.
type Queues<Q> = Arc<Mutex<HashMap<<Q as Question>::Group, Vec<(<Q as Question>::Value, Waiter<Q>)>>>>;

/// Gathers lookups of question `Q` into batches.
pub struct Batcher<Q: Question> {
    api: Arc<PortalApi>,
    pending: Queues<Q>,
}

impl<Q: Question> Batcher<Q> {
    /// Batches lookups to `api`.
    pub fn new(api: Arc<PortalApi>) -> Batcher<Q> {
        Batcher { api, pending: Arc::default() }
    }

    /// The answer for `value` of `group`, `None` when the portal knows nothing of it.
    pub async fn ask(&self, group: Q::Group, value: Q::Value) -> Result<Option<Q::Answer>, ApiError> {
        let (tx, rx) = oneshot::channel();
        let leads = {
            let mut pending = self.pending.lock().expect("batch queue poisoned");
            let queue = pending.entry(group.clone()).or_default();
            queue.push((value, tx));
            queue.len() == 1
        };
        if leads {
            // The batch is sent by a task of its own, so that it goes out (and answers every
            // waiter) even if this lookup is abandoned.
            let (api, pending) = (self.api.clone(), self.pending.clone());
            tokio::spawn(async move {
                tokio::time::sleep(WINDOW).await;
                let mut batch = pending.lock().expect("batch queue poisoned").remove(&group).unwrap_or_default();
                while !batch.is_empty() {
                    let part: Vec<(Q::Value, Waiter<Q>)> = batch.drain(..batch.len().min(MAX_BATCH)).collect();
                    let mut values: Vec<Q::Value> = part.iter().map(|(value, _)| value.clone()).collect();
                    values.sort_unstable();
                    values.dedup();
                    let answer = Q::ask(&api, &group, &values).await;
                    for (value, waiter) in part {
                        let _ =
                            waiter.send(answer.as_ref().map(|found| found.get(&value).cloned()).map_err(Clone::clone));
                    }
                }
            });
        }
        rx.await.unwrap_or_else(|_| Err(ApiError::Garbled("the batch was dropped".into())))
    }
}
