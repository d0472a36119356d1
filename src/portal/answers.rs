//! The API's answers, kept: in memory, and in the cache directory so that a remount, or every
//! node of a cluster sharing the directory, asks the API once per answer and TTL, not once per
//! mount. One small JSON file per answer, written atomically (temp file + rename), read and
//! written through [`CacheDirIo`]. Each answer has its own TTL (a "no such id" is trusted for
//! less time than a key: new ids appear with every ingest). An answer past its TTL is asked
//! again; when the API then fails, the old answer keeps serving (ids are never reused, so it is
//! at worst out of date).

use std::fs;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// Concurrent callers of one name share one fetch.
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
                match fetch.await {
                    Ok(value) => {
                        let ttl = ttl_of(&value);
                        self.save(name, &value, ttl).await;
                        Ok(Kept { value: Arc::new(value), ttl })
                    }
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
        assert_eq!(fs::read_dir(dir.path().join("portal")).unwrap().count(), 3, "no temp files left");
    }
}
