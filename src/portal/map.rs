//! The portal's map of the bucket, as the mount shows it: which key a portal id names, which
//! folders make up the facet folders (`by-organism/`, `by-sample-type/`, `by-object/`), and
//! the reverse, which id the object at a folder has (`user.cryoet.id`). Answers come from the
//! API through [`Answers`]; an answer naming an id's key also answers the reverse question.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tracing::warn;

use super::answers::Answers;
use super::api::{ApiError, PortalApi};
use super::batch::{Batcher, Identify, Locate};
use super::ids::{folder_of, Kind, PortalId};
use super::DEFAULT_BUCKET;
use crate::namespace::names::MAX_NAME_BYTES;

/// Longest an answer "the portal knows no such id" is trusted: new ids appear with each ingest.
pub const NOT_FOUND_TTL: Duration = Duration::from_secs(600);

/// The facet folders at the mount's root.
pub const FACETS: [&str; 3] = ["by-organism", "by-sample-type", "by-object"];

/// The facets of datasets, with their column in the `datasets` answer.
const DATASET_FACETS: [(&str, usize); 2] = [("by-organism", 2), ("by-sample-type", 3)];

/// One entry of a facet folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FacetEntry {
    /// A folder (an organism, an object).
    Folder(String),
    /// A symlink named `name` to the bucket key `key`.
    Link { name: String, key: String },
}

/// The API's view of the bucket, for one mount.
pub struct PortalMap {
    api: Arc<PortalApi>,
    /// How long answers are trusted ("no such id" answers: at most [`NOT_FOUND_TTL`]).
    ttl: Duration,
    /// Ids to keys.
    batcher: Batcher<Locate>,
    /// Keys to ids.
    reverse: Batcher<Identify>,
    answers: Answers,
}

impl PortalMap {
    /// A map asking `api`, keeping its answers in `answers`.
    pub fn new(api: PortalApi, answers: Answers, ttl: Duration) -> PortalMap {
        let api = Arc::new(api);
        PortalMap { batcher: Batcher::new(api.clone()), reverse: Batcher::new(api.clone()), api, ttl, answers }
    }

    /// How long `answer` is trusted: a "none" (`field` null) at most [`NOT_FOUND_TTL`].
    fn ttl_of(&self, answer: &Value, field: &str) -> Duration {
        match answer[field] {
            Value::Null => self.ttl.min(NOT_FOUND_TTL),
            _ => self.ttl,
        }
    }

    /// The key `id` names, `None` when the portal does not know it.
    pub async fn locate(&self, id: PortalId) -> Result<Option<String>, ApiError> {
        let answer = self
            .answers
            .get(&format!("id:{id}"), |answer| self.ttl_of(answer, "key"), async {
                let key = self.batcher.ask(id.kind, id.number).await?;
                // The reverse question is answered too (a tomogram's or tilt series' folder,
                // and so its files, is that object).
                let folder = match id.kind {
                    Kind::Tomogram | Kind::TiltSeries => key.as_deref().and_then(folder_of),
                    _ => key.clone(),
                };
                if let Some(folder) = folder {
                    self.answers.put(&reverse_name(&folder), json!({ "id": id.to_string() }), self.ttl, true).await;
                }
                Ok(json!({ "key": key }))
            })
            .await
            .inspect_err(|e| warn!(%id, error = %e, "cannot resolve a portal id"))?;
        Ok(answer.get("key").and_then(Value::as_str).map(str::to_owned))
    }

    /// The portal id of the object of `kind` at `folder` (its key ends in `/`), whose key field
    /// `path` (e.g. `s3MrcFile`) holds `key`: one query (batched), unless an answer already told it;
    /// `None` when the portal has no such object.
    pub async fn identify(
        &self,
        kind: Kind,
        folder: &str,
        path: &'static str,
        key: &str,
    ) -> Result<Option<String>, ApiError> {
        let answer = self
            .answers
            .get(&reverse_name(folder), |answer| self.ttl_of(answer, "id"), async {
                let url = format!("s3://{DEFAULT_BUCKET}/{key}");
                let found = self.reverse.ask((kind, path), url).await?;
                let id = found.map(|number| PortalId { kind, number }.to_string());
                Ok(json!({ "id": id }))
            })
            .await
            .inspect_err(|e| warn!(folder, error = %e, "cannot find the portal id of a folder"))?;
        Ok(answer.get("id").and_then(Value::as_str).map(str::to_owned))
    }

    /// The entries of facet folder `path` (`by-organism`, `by-object/membrane`, ...) of a mount
    /// of the keys `within` (its `--prefix`: an organism or sample type with no dataset there
    /// has no folder); `None` when there is no such folder.
    pub async fn facet(&self, path: &str, within: &str) -> Result<Option<Vec<FacetEntry>>, ApiError> {
        let (facet, value) = path.split_once('/').map_or((path, None), |(f, v)| (f, Some(v)));
        if let Some(&(_, column)) = DATASET_FACETS.iter().find(|(name, _)| *name == facet) {
            let groups = self.dataset_groups(column).await.map(|mut groups| {
                groups.retain(|_, datasets| {
                    datasets.retain(|(_, key)| key.starts_with(within));
                    !datasets.is_empty()
                });
                groups
            });
            return groups
                .map(|groups| match value {
                    None => Some(folders(groups.keys())),
                    Some(shown) => {
                        let datasets = groups.into_iter().find(|(name, _)| shown_name(name) == shown)?.1;
                        Some(datasets.into_iter().map(|(id, key)| self.dataset_link(id, key)).collect())
                    }
                })
                .inspect_err(|e| warn!(path, error = %e, "cannot list a facet folder"));
        }
        let result = match path.split_once('/') {
            None if path == "by-object" => self.objects().await.map(|o| Some(folders(o.iter()))),
            Some(("by-object", shown)) => match self.objects().await?.into_iter().find(|o| shown_name(o) == shown) {
                Some(object) => self.object_entries(&object).await.map(Some),
                None => Ok(None),
            },
            _ => Ok(None),
        };
        result.inspect_err(|e| warn!(path, error = %e, "cannot list a facet folder"))
    }

    /// Value of `column` (organism, sample type) -> its datasets (id, key), from one paged list
    /// of all datasets (so every dataset facet costs one request together).
    async fn dataset_groups(&self, column: usize) -> Result<BTreeMap<String, Vec<(i32, String)>>, ApiError> {
        let answer = self
            .answers
            .get("datasets", |_| self.ttl, async {
                let rows = self.api.datasets().await?;
                let rows = rows.into_iter().map(|d| json!([d.id, d.key, d.organism, d.sample_type]));
                Ok(Value::Array(rows.collect()))
            })
            .await?;
        let mut groups: BTreeMap<String, Vec<(i32, String)>> = BTreeMap::new();
        for row in answer.as_array().into_iter().flatten() {
            let (Some(id), Some(key), Some(value)) = (row[0].as_i64(), row[1].as_str(), row[column].as_str()) else {
                continue;
            };
            let Ok(id) = i32::try_from(id) else { continue };
            groups.entry(value.to_owned()).or_default().push((id, key.to_owned()));
        }
        Ok(groups)
    }

    async fn objects(&self) -> Result<Vec<String>, ApiError> {
        let answer =
            self.answers.get("objects", |_| self.ttl, async { Ok(json!(self.api.annotated_objects().await?)) }).await?;
        Ok(answer.as_array().into_iter().flatten().filter_map(|n| n.as_str().map(str::to_owned)).collect())
    }

    /// The datasets and runs holding annotations of `object`.
    async fn object_entries(&self, object: &str) -> Result<Vec<FacetEntry>, ApiError> {
        let answer = self
            .answers
            .get(&format!("object:{object}"), |_| self.ttl, async {
                let runs = self.api.runs_with_object(object).await?;
                Ok(Value::Array(runs.into_iter().map(|r| json!([r.id, r.key])).collect()))
            })
            .await?;
        let mut datasets = BTreeSet::new();
        let mut entries = Vec::new();
        for row in answer.as_array().into_iter().flatten() {
            let (Some(id), Some(key)) = (row[0].as_i64(), row[1].as_str()) else { continue };
            let Ok(number) = i32::try_from(id) else { continue };
            let name = PortalId { kind: Kind::Run, number }.to_string();
            // Many runs: kept in memory only (the facet's own answer is saved).
            self.answers.put(&reverse_name(key), json!({ "id": name }), self.ttl, false).await;
            if let Some(dataset) = folder_of(key) {
                datasets.insert(dataset);
            }
            entries.push(FacetEntry::Link { name, key: key.to_owned() });
        }
        for key in datasets {
            let Some(id) = key.trim_end_matches('/').parse().ok() else { continue };
            entries.push(self.dataset_link(id, key));
        }
        Ok(entries)
    }

    fn dataset_link(&self, id: i32, key: String) -> FacetEntry {
        FacetEntry::Link { name: PortalId { kind: Kind::Dataset, number: id }.to_string(), key }
    }
}

/// The name of the answer "which portal id has the object at `folder`".
fn reverse_name(folder: &str) -> String {
    format!("key:{folder}")
}

/// The name a facet value (an organism, an object) takes as a folder: `/` and NUL cannot be in
/// a name, and a name has at most [`MAX_NAME_BYTES`].
pub fn shown_name(value: &str) -> String {
    let mut name: String = value.chars().map(|c| if c == '/' || c == '\0' { '_' } else { c }).collect();
    while name.len() > MAX_NAME_BYTES {
        name.pop();
    }
    name
}

fn folders<'a>(values: impl Iterator<Item = &'a String>) -> Vec<FacetEntry> {
    let names: BTreeSet<String> =
        values.map(|v| shown_name(v)).filter(|n| !n.is_empty() && n != "." && n != "..").collect();
    names.into_iter().map(FacetEntry::Folder).collect()
}
