//! The API's answers, kept: in memory, and in the cache directory so that a remount, or every
//! node of a cluster sharing the directory, asks the API once per answer and TTL, not once per
//! mount. One small JSON file per answer, written atomically (temp file + rename), read and
//! written through [`CacheDirIo`]. An answer older than the TTL is asked again; when the API
//! then fails, the old answer keeps serving (ids are never reused, so it is at worst out of date).

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

#[derive(Serialize, Deserialize)]
struct Saved {
    /// The API the answer came from (one cache directory may serve mounts of several).
    api: String,
    name: String,
    fetched_at: u64,
    value: Value,
}

/// Answers of one API, by name (`id:RN-241`, `datasets`, ...).
pub struct Answers {
    api: String,
    ttl: Duration,
    memory: moka::future::Cache<String, Arc<Value>>,
    dir: Option<(PathBuf, Arc<CacheDirIo>)>,
    temp_counter: AtomicU64,
}

impl Answers {
    /// Answers of the API at `api` trusted for `ttl`, also kept under `<cache_dir>/portal`.
    pub fn new(api: &str, ttl: Duration, cache_dir: Option<(PathBuf, Arc<CacheDirIo>)>) -> std::io::Result<Answers> {
        let dir = match cache_dir {
            Some((dir, io)) => {
                let dir = dir.join("portal");
                fs::create_dir_all(&dir)?;
                Some((dir, io))
            }
            None => None,
        };
        let memory = moka::future::Cache::builder().max_capacity(IN_MEMORY).time_to_live(ttl).build();
        Ok(Answers { api: api.to_owned(), ttl, memory, dir, temp_counter: AtomicU64::new(0) })
    }

    /// The answer called `name`: from memory, else from the cache directory while fresh, else
    /// from `fetch` (then kept), else a saved answer past its TTL. Concurrent callers of one name
    /// share one fetch.
    pub async fn get<F>(&self, name: &str, fetch: F) -> Result<Arc<Value>, ApiError>
    where
        F: Future<Output = Result<Value, ApiError>>,
    {
        self.memory
            .try_get_with(name.to_owned(), async {
                let saved = self.load(name).await;
                if let Some((value, true)) = saved {
                    return Ok(Arc::new(value));
                }
                match fetch.await {
                    Ok(value) => {
                        self.save(name, &value).await;
                        Ok(Arc::new(value))
                    }
                    Err(e) => match saved {
                        Some((value, _)) => {
                            warn!(name, error = %e, "the portal API failed; serving its last answer");
                            Ok(Arc::new(value))
                        }
                        None => Err(e),
                    },
                }
            })
            .await
            .map_err(|e: Arc<ApiError>| (*e).clone())
    }

    fn path(&self, dir: &std::path::Path, name: &str) -> PathBuf {
        let hash = crate::hash::stable_hash(&[self.api.as_bytes(), name.as_bytes()]);
        dir.join(format!("{hash:016x}.json"))
    }

    /// The saved answer `name` and whether it is still fresh.
    async fn load(&self, name: &str) -> Option<(Value, bool)> {
        let (dir, io) = self.dir.as_ref()?;
        let (path, api, name, ttl) = (self.path(dir, name), self.api.clone(), name.to_owned(), self.ttl);
        io.run(move || {
            let saved: Saved = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
            if saved.api != api || saved.name != name {
                return None;
            }
            Some((saved.value, now_secs().saturating_sub(saved.fetched_at) < ttl.as_secs()))
        })
        .await
        .flatten()
    }

    async fn save(&self, name: &str, value: &Value) {
        let Some((dir, io)) = &self.dir else { return };
        let target = self.path(dir, name);
        let temp = target.with_extension(format!(
            "tmp.{}.{}",
            std::process::id(),
            self.temp_counter.fetch_add(1, Ordering::Relaxed)
        ));
        let saved =
            Saved { api: self.api.clone(), name: name.to_owned(), fetched_at: now_secs(), value: value.clone() };
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

    fn answers(dir: &std::path::Path, ttl: Duration) -> Answers {
        Answers::new("http://api", ttl, Some((dir.to_owned(), Arc::new(CacheDirIo::new(Duration::from_secs(1))))))
            .unwrap()
    }

    #[tokio::test]
    async fn answers_are_shared_through_the_cache_dir_and_outlive_a_failing_api() {
        let dir = tempfile::tempdir().unwrap();
        let first = answers(dir.path(), Duration::from_secs(3600));
        let got = first.get("id:RN-1", async { Ok(json!({"key": "1/a/"})) }).await.unwrap();
        assert_eq!(*got, json!({"key": "1/a/"}));
        // Another mount on the same directory: no fetch.
        let second = answers(dir.path(), Duration::from_secs(3600));
        let got = second.get("id:RN-1", async { panic!("fetched again") }).await.unwrap();
        assert_eq!(*got, json!({"key": "1/a/"}));
        // Expired, and the API fails: the old answer serves; with none, the error comes through.
        let expired = answers(dir.path(), Duration::ZERO);
        let got = expired.get("id:RN-1", async { Err(ApiError::Status(503)) }).await.unwrap();
        assert_eq!(*got, json!({"key": "1/a/"}));
        let missing = expired.get("id:RN-2", async { Err(ApiError::Status(503)) }).await;
        assert!(matches!(missing, Err(ApiError::Status(503))));
        assert_eq!(fs::read_dir(dir.path().join("portal")).unwrap().count(), 1, "no temp files left");
    }
}
