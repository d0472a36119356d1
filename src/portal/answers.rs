//! The API's answers, kept: in memory, and in the cache directory so that a remount, or every
//! node of a cluster sharing the directory, asks the API once per answer and TTL, not once per
//! mount. One small JSON file per answer, written atomically (temp file + rename), read and
//! written through [`CacheDirIo`]. Each answer has its own TTL (a "no such id" is trusted for
//! less time than a key: new ids appear with every ingest). An answer past its TTL is asked
//! again; when the API then fails, the old answer keeps serving (ids are never reused, so it is
//! at worst out of date).
//!
//! Mounts sharing the directory also share the asking: the first to miss an answer claims it
//! (a `.claim` file created exclusively) and the others wait for its answer file instead of
//! asking too, so a job array of 500 nodes resolving one id at the same second sends one query.

use std::fs;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::warn;

use super::api::ApiError;
use crate::cache::offload::CacheDirIo;

/// Most answers held in memory.
const IN_MEMORY: u64 = 100_000;
/// How long a saved answer past its TTL serves from memory (the API having failed) before the
/// API is asked again.
const STALE_RETRY: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize)]
struct Saved {
    /// The API the answer came from (one cache directory may serve mounts of several).
    api: String,
    name: String,
    fetched_at: u64,
    ttl_secs: u64,
    value: Value,
}

/// How long a mount waits for the answer another mount claimed (longer than a call's timeout).
const CLAIM_WAIT: Duration = Duration::from_secs(30);
/// How often a waiting mount looks for that answer.
const CLAIM_POLL: Duration = Duration::from_millis(50);

/// Who asks the API for an answer another mount may be asking for too.
enum Claim {
    /// This mount: the claim file to remove afterwards (none when there is no cache dir).
    Ours(Option<PathBuf>),
    /// Another mount did, and here is its answer.
    Answered(Kept),
    /// Another mount did and got no answer (the API is down for all of them).
    FailedElsewhere,
}

/// What trying to create a claim file found.
enum Taken {
    Ours,
    Theirs,
    Abandoned,
    Unclaimable,
}

/// An answer in memory, with how long it is trusted.
#[derive(Clone)]
struct Kept {
    value: Arc<Value>,
    ttl: Duration,
}

/// Each answer in memory lives for its own TTL.
struct OwnTtl;

impl moka::Expiry<String, Kept> for OwnTtl {
    fn expire_after_create(&self, _: &String, kept: &Kept, _: std::time::Instant) -> Option<Duration> {
        Some(kept.ttl)
    }
}

/// Answers of one API, by name (`id:RN-241`, `datasets`, ...).
pub struct Answers {
    api: String,
    memory: moka::future::Cache<String, Kept>,
    dir: Option<(PathBuf, Arc<CacheDirIo>)>,
    temp_counter: AtomicU64,
}

impl Answers {
    /// Answers of the API at `api`, also kept under `<cache_dir>/portal`.
    pub fn new(api: &str, cache_dir: Option<(PathBuf, Arc<CacheDirIo>)>) -> std::io::Result<Answers> {
        let dir = match cache_dir {
            Some((dir, io)) => {
                let dir = dir.join("portal");
                fs::create_dir_all(&dir)?;
                Some((dir, io))
            }
            None => None,
        };
        let memory = moka::future::Cache::builder().max_capacity(IN_MEMORY).expire_after(OwnTtl).build();
        Ok(Answers { api: api.to_owned(), memory, dir, temp_counter: AtomicU64::new(0) })
    }

    /// The answer called `name`: from memory, else from the cache directory while fresh, else
    /// from `fetch` (then kept for the TTL `ttl_of` gives it), else a saved answer past its TTL.
    /// Concurrent callers of one name share one fetch, in this mount and across the mounts
    /// sharing the cache directory.
    pub async fn get<F>(
        &self,
        name: &str,
        ttl_of: impl Fn(&Value) -> Duration,
        fetch: F,
    ) -> Result<Arc<Value>, ApiError>
    where
        F: Future<Output = Result<Value, ApiError>>,
    {
        let kept = self
            .memory
            .try_get_with(name.to_owned(), async {
                let saved = self.load(name).await;
                if let Some((value, Some(ttl))) = saved {
                    return Ok(Kept { value: Arc::new(value), ttl });
                }
                let fetched = match self.claim(name).await {
                    Claim::Answered(kept) => return Ok(kept),
                    Claim::FailedElsewhere => Err(ApiError::FailedElsewhere),
                    Claim::Ours(claim) => {
                        let fetched = fetch.await;
                        if let Ok(value) = &fetched {
                            self.save(name, value, ttl_of(value)).await;
                        }
                        self.release(claim).await;
                        fetched
                    }
                };
                match fetched {
                    Ok(value) => Ok(Kept { ttl: ttl_of(&value), value: Arc::new(value) }),
                    Err(e) => match saved {
                        Some((value, _)) => {
                            warn!(name, error = %e, "the portal API failed; serving its last answer");
                            Ok(Kept { value: Arc::new(value), ttl: STALE_RETRY })
                        }
                        None => Err(e),
                    },
                }
            })
            .await
            .map_err(|e: Arc<ApiError>| (*e).clone())?;
        Ok(kept.value)
    }

    /// Keeps `value` as the answer `name` without asking for it (an answer to another question
    /// told it): in memory, and with `save` in the cache directory too.
    pub async fn put(&self, name: &str, value: Value, ttl: Duration, save: bool) {
        if save {
            self.save(name, &value, ttl).await;
        }
        self.memory.insert(name.to_owned(), Kept { value: Arc::new(value), ttl }).await;
    }

    /// Waits while another mount sharing the cache directory asks for `name` (it holds the
    /// claim) and returns its answer; or claims the asking for this mount. A claim older than
    /// [`CLAIM_WAIT`] was abandoned (its mount died) and is taken over.
    async fn claim(&self, name: &str) -> Claim {
        let Some((dir, io)) = &self.dir else { return Claim::Ours(None) };
        let path = self.path(dir, name).with_extension("claim");
        let deadline = Instant::now() + CLAIM_WAIT;
        let mut waited = false;
        loop {
            let claim = path.clone();
            let taken = io
                .run(move || match fs::OpenOptions::new().write(true).create_new(true).open(&claim) {
                    Ok(_) => Taken::Ours,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let age = fs::metadata(&claim).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                        if age.is_some_and(|age| age > CLAIM_WAIT) {
                            let _ = fs::remove_file(&claim);
                            return Taken::Abandoned;
                        }
                        Taken::Theirs
                    }
                    Err(_) => Taken::Unclaimable,
                })
                .await;
            match taken {
                // Claimed after waiting for another mount: it released its claim with no
                // answer, so the API failed it; don't ask again right behind it.
                Some(Taken::Ours) if waited => {
                    self.release(Some(path)).await;
                    return match self.load(name).await {
                        Some((value, Some(ttl))) => Claim::Answered(Kept { value: Arc::new(value), ttl }),
                        _ => Claim::FailedElsewhere,
                    };
                }
                Some(Taken::Ours) => return Claim::Ours(Some(path)),
                // Its mount died: removed, claim it again.
                Some(Taken::Abandoned) => continue,
                // The directory takes no claims, or is too slow: ask without one.
                Some(Taken::Unclaimable) | None => return Claim::Ours(None),
                // Another mount is asking: wait for its answer.
                Some(Taken::Theirs) => {
                    waited = true;
                    tokio::time::sleep(CLAIM_POLL).await;
                    if let Some((value, Some(ttl))) = self.load(name).await {
                        return Claim::Answered(Kept { value: Arc::new(value), ttl });
                    }
                    if Instant::now() > deadline {
                        return Claim::Ours(None);
                    }
                }
            }
        }
    }

    /// Gives up a claim (the answer, if any, is saved by now).
    async fn release(&self, claim: Option<PathBuf>) {
        let (Some(path), Some((_, io))) = (claim, &self.dir) else { return };
        io.run(move || fs::remove_file(path)).await;
    }

    fn path(&self, dir: &std::path::Path, name: &str) -> PathBuf {
        let hash = crate::hash::stable_hash(&[self.api.as_bytes(), name.as_bytes()]);
        dir.join(format!("{hash:016x}.json"))
    }

    /// The saved answer `name`, and how much longer it is fresh (`None`: no longer).
    async fn load(&self, name: &str) -> Option<(Value, Option<Duration>)> {
        let (dir, io) = self.dir.as_ref()?;
        let (path, api, name) = (self.path(dir, name), self.api.clone(), name.to_owned());
        io.run(move || {
            let saved: Saved = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
            if saved.api != api || saved.name != name {
                return None;
            }
            let left = (saved.fetched_at + saved.ttl_secs).checked_sub(now_secs()).filter(|left| *left > 0);
            Some((saved.value, left.map(Duration::from_secs)))
        })
        .await
        .flatten()
    }

    async fn save(&self, name: &str, value: &Value, ttl: Duration) {
        let Some((dir, io)) = &self.dir else { return };
        let target = self.path(dir, name);
        let temp = target.with_extension(format!(
            "tmp.{}.{}",
            std::process::id(),
            self.temp_counter.fetch_add(1, Ordering::Relaxed)
        ));
        let saved = Saved {
            api: self.api.clone(),
            name: name.to_owned(),
            fetched_at: now_secs(),
            ttl_secs: ttl.as_secs(),
            value: value.clone(),
        };
        let Ok(json) = serde_json::to_vec(&saved) else { return };
        io.run(move || {
            if fs::write(&temp, json).and_then(|()| fs::rename(&temp, &target)).is_err() {
                let _ = fs::remove_file(&temp);
            }
        })
        .await;
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HOUR: Duration = Duration::from_secs(3600);

    fn answers(dir: &std::path::Path) -> Answers {
        Answers::new("http://api", Some((dir.to_owned(), Arc::new(CacheDirIo::new(Duration::from_secs(1)))))).unwrap()
    }

    #[tokio::test]
    async fn answers_are_shared_through_the_cache_dir_and_outlive_a_failing_api() {
        let dir = tempfile::tempdir().unwrap();
        let got = answers(dir.path()).get("id:RN-1", |_| HOUR, async { Ok(json!({"key": "1/a/"})) }).await.unwrap();
        assert_eq!(*got, json!({"key": "1/a/"}));
        // Another mount on the same directory: no fetch.
        let got = answers(dir.path()).get("id:RN-1", |_| HOUR, async { panic!("fetched again") }).await.unwrap();
        assert_eq!(*got, json!({"key": "1/a/"}));
        // An answer kept for no time is asked again, and the new answer kept.
        answers(dir.path()).get("id:RN-3", |_| Duration::ZERO, async { Ok(json!({"key": null})) }).await.unwrap();
        let got = answers(dir.path()).get("id:RN-3", |_| HOUR, async { Ok(json!({"key": "3/c/"})) }).await.unwrap();
        assert_eq!(*got, json!({"key": "3/c/"}), "an expired answer is asked again");
        let got = answers(dir.path()).get("id:RN-3", |_| HOUR, async { panic!("fetched again") }).await.unwrap();
        assert_eq!(*got, json!({"key": "3/c/"}));
        // Expired, and the API fails: the old answer serves; with none, the error comes through.
        answers(dir.path()).get("id:RN-4", |_| Duration::ZERO, async { Ok(json!({"key": "4/d/"})) }).await.unwrap();
        let got = answers(dir.path()).get("id:RN-4", |_| HOUR, async { Err(ApiError::Status(503)) }).await.unwrap();
        assert_eq!(*got, json!({"key": "4/d/"}));
        let missing = answers(dir.path()).get("id:RN-2", |_| HOUR, async { Err(ApiError::Status(503)) }).await;
        assert!(matches!(missing, Err(ApiError::Status(503))));
        assert_eq!(fs::read_dir(dir.path().join("portal")).unwrap().count(), 3, "no temp or claim files left");
    }

    #[tokio::test]
    async fn mounts_sharing_the_cache_dir_ask_once_for_an_answer_wanted_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (answers(dir.path()), answers(dir.path()));
        let slow = |answer: Result<Value, ApiError>| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            answer
        };
        let (a, b) = tokio::join!(first.get("id:RN-5", |_| HOUR, slow(Ok(json!({"key": "5/e/"})))), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            second.get("id:RN-5", |_| HOUR, async { panic!("asked while another mount was asking") }).await
        });
        assert_eq!((a.unwrap().as_ref(), b.unwrap().as_ref()), (&json!({"key": "5/e/"}), &json!({"key": "5/e/"})));
        // The asking mount got no answer: the waiting one does not ask right behind it.
        let (third, fourth) = (answers(dir.path()), answers(dir.path()));
        let (a, b) = tokio::join!(third.get("id:RN-6", |_| HOUR, slow(Err(ApiError::Status(503)))), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            fourth.get("id:RN-6", |_| HOUR, async { panic!("asked right behind a failure") }).await
        });
        assert!(matches!((a, b), (Err(ApiError::Status(503)), Err(ApiError::FailedElsewhere))));
        // Once that is over, the next lookup asks again.
        let got = fourth.get("id:RN-6", |_| HOUR, async { Ok(json!({"key": "6/f/"})) }).await.unwrap();
        assert_eq!(*got, json!({"key": "6/f/"}));
        assert_eq!(fs::read_dir(dir.path().join("portal")).unwrap().count(), 2, "no claim files left");
    }
}
