//! The portal's metadata as extended attributes (`user.cryoet.*`), from the bucket's own JSON
//! sidecars, so they need no API: which folder level has which sidecar (by its place in the key
//! layout, a string test that costs nothing for the many folders that have none), which fields
//! of it become which attributes, and reading and parsing the sidecar once per version.
//! Files directly in such a folder (a tomogram's `.mrc`) carry the folder's attributes too.
//! The one attribute not in the JSON, `user.cryoet.id` of runs, tomograms, tilt series,
//! alignments and annotations (database ids), is listed by the folder's level alone and asked of
//! the API ([`PortalMap::identify`]) only when it is read.

use std::sync::Arc;

use serde_json::Value;

use super::ids::{Kind, PortalId};
use super::map::PortalMap;
use crate::data::DataPath;
use crate::namespace::{Entry, Namespace, NamespaceError, Node};
use crate::store::ObjectMeta;

/// What every attribute name here starts with.
pub const PREFIX: &str = "user.cryoet.";

/// Parsed sidecars kept in memory.
const PARSED: u64 = 10_000;

/// Attributes (full names) with their values.
pub type Attributes = Vec<(String, String)>;

/// The kinds of folder that have a metadata sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Dataset,
    Deposition,
    Run,
    TiltSeries,
    Alignment,
    Tomogram,
    Annotation,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Dataset => "dataset",
            Level::Deposition => "deposition",
            Level::Run => "run",
            Level::TiltSeries => "tiltseries",
            Level::Alignment => "alignment",
            Level::Tomogram => "tomogram",
            Level::Annotation => "annotation",
        }
    }

    /// The kind of portal id the folder's object has in the database (`None`: its id is in the
    /// key layout, or it has none).
    fn database_kind(self) -> Option<Kind> {
        match self {
            Level::Run => Some(Kind::Run),
            Level::TiltSeries => Some(Kind::TiltSeries),
            Level::Alignment => Some(Kind::Alignment),
            Level::Tomogram => Some(Kind::Tomogram),
            Level::Annotation => Some(Kind::Annotation),
            Level::Dataset | Level::Deposition => None,
        }
    }

    /// The sidecar's file name; `None` for annotations, whose `<object>-<version>.json` is found
    /// by listing.
    fn sidecar(self) -> Option<&'static str> {
        match self {
            Level::Dataset => Some("dataset_metadata.json"),
            Level::Deposition => Some("deposition_metadata.json"),
            Level::Run => Some("run_metadata.json"),
            Level::TiltSeries => Some("tiltseries_metadata.json"),
            Level::Alignment => Some("alignment_metadata.json"),
            Level::Tomogram => Some("tomogram_metadata.json"),
            Level::Annotation => None,
        }
    }

    /// Attribute name, the JSON paths joined for its value (`[]` maps over an array), and the
    /// text between them.
    fn fields(self) -> &'static [(&'static str, &'static [&'static str], &'static str)] {
        match self {
            Level::Dataset => &[
                ("title", &["dataset_title"], ""),
                ("organism", &["organism.name"], ""),
                ("organism_taxid", &["organism.taxonomy_id"], ""),
                ("sample_type", &["sample_type"], ""),
                ("cell_type", &["cell_type.name"], ""),
                ("tissue", &["tissue.name"], ""),
                ("cell_strain", &["cell_strain.name"], ""),
                ("deposition_id", &["deposition_id"], ""),
            ],
            Level::Deposition => {
                &[("title", &["deposition_title"], ""), ("deposition_types", &["deposition_types"], "")]
            }
            Level::Run => &[("run_name", &["run_name"], "")],
            Level::TiltSeries => &[
                ("microscope", &["microscope.manufacturer", "microscope.model"], " "),
                ("camera", &["camera.manufacturer", "camera.model"], " "),
                ("tilt_range", &["tilt_range.min", "tilt_range.max"], ".."),
                ("tilt_step", &["tilt_step"], ""),
                ("pixel_spacing", &["pixel_spacing"], ""),
                ("acceleration_voltage", &["acceleration_voltage"], ""),
            ],
            Level::Alignment => &[("alignment_type", &["alignment_type"], ""), ("method", &["alignment_method"], "")],
            Level::Tomogram => &[
                ("voxel_spacing", &["voxel_spacing"], ""),
                ("size", &["size.x", "size.y", "size.z"], "x"),
                ("reconstruction_method", &["reconstruction_method"], ""),
                ("reconstruction_software", &["reconstruction_software"], ""),
                ("processing", &["processing"], ""),
                ("ctf_corrected", &["ctf_corrected"], ""),
            ],
            Level::Annotation => &[
                ("object_name", &["annotation_object.name"], ""),
                ("object_id", &["annotation_object.id"], ""),
                ("object_state", &["annotation_object.state"], ""),
                ("shape_type", &["files[].shape"], ","),
                ("method_type", &["method_type"], ""),
                ("ground_truth", &["ground_truth_status"], ""),
                ("precision", &["confidence.precision"], ""),
                ("recall", &["confidence.recall"], ""),
                ("object_count", &["object_count"], ""),
            ],
        }
    }
}

/// The level of folder `prefix` (a key prefix ending in `/`) by its place in the key layout.
pub fn level_of(prefix: &str) -> Option<Level> {
    let parts: Vec<&str> = prefix.strip_suffix('/')?.split('/').collect();
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if parts[0] == "depositions_metadata" {
        return (parts.len() == 2 && numeric(parts[1])).then_some(Level::Deposition);
    }
    if !numeric(parts[0]) {
        return None;
    }
    match parts[1..] {
        [] => Some(Level::Dataset),
        [run] if run != "Images" => Some(Level::Run),
        [_, "TiltSeries", n] if numeric(n) => Some(Level::TiltSeries),
        [_, "Alignments", n] if numeric(n) => Some(Level::Alignment),
        [_, "Reconstructions", spacing, "Tomograms", n] if spacing.starts_with("VoxelSpacing") && numeric(n) => {
            Some(Level::Tomogram)
        }
        [_, "Reconstructions", spacing, "Annotations", n] if spacing.starts_with("VoxelSpacing") && numeric(n) => {
            Some(Level::Annotation)
        }
        _ => None,
    }
}

/// The folder whose metadata `node` carries: its own for a folder, its folder's for a file.
pub fn folder_of_node(node: &Node) -> Option<String> {
    let folder = match node {
        Node::Dir { prefix } => prefix.clone(),
        Node::File(object) => object.key[..=object.key.rfind('/')?].to_owned(),
        Node::View(_) | Node::Link { .. } | Node::Facet { .. } => return None,
    };
    level_of(&folder).map(|_| folder)
}

/// The attributes (full names) a sidecar of `level` gives.
pub fn attributes(level: Level, json: &Value) -> Attributes {
    let mut out = vec![(format!("{PREFIX}kind"), level.name().to_owned())];
    for (name, paths, between) in level.fields() {
        let values: Vec<String> = paths.iter().flat_map(|path| values_at(json, path)).collect();
        if !values.is_empty() {
            out.push((format!("{PREFIX}{name}"), values.join(between)));
        }
    }
    let fixed = match level {
        Level::Dataset => json.get("dataset_identifier").and_then(Value::as_i64).map(|n| (Kind::Dataset, n)),
        Level::Deposition => json.get("deposition_identifier").and_then(Value::as_i64).map(|n| (Kind::Deposition, n)),
        _ => None,
    };
    if let Some((kind, number)) = fixed.and_then(|(kind, n)| Some((kind, i32::try_from(n).ok()?))) {
        out.push((format!("{PREFIX}id"), PortalId { kind, number }.to_string()));
    }
    out
}

/// The values at a dotted `path` of `json` (`a.b`; `a[].b` for each element of array `a`), as
/// text; absent and null values give none.
fn values_at(json: &Value, path: &str) -> Vec<String> {
    let (head, rest) = path.split_once('.').map_or((path, None), |(h, r)| (h, Some(r)));
    let (field, each) = head.strip_suffix("[]").map_or((head, false), |f| (f, true));
    let Some(value) = json.get(field) else { return Vec::new() };
    let items: Vec<&Value> = if each { value.as_array().into_iter().flatten().collect() } else { vec![value] };
    let mut out: Vec<String> = Vec::new();
    for item in items {
        let found = match rest {
            Some(rest) => values_at(item, rest),
            None => text(item).into_iter().collect(),
        };
        for v in found {
            if !out.contains(&v) {
                out.push(v);
            }
        }
    }
    out
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Reads the sidecars behind the attributes, once per object version.
pub struct MetadataReader {
    namespace: Arc<Namespace>,
    data: Arc<DataPath>,
    portal: Option<Arc<PortalMap>>,
    parsed: moka::future::Cache<(String, String), Arc<Attributes>>,
}

impl MetadataReader {
    /// A reader finding sidecars through `namespace`, reading them through `data`, and adding
    /// the ids `portal` knows.
    pub fn new(namespace: Arc<Namespace>, data: Arc<DataPath>, portal: Option<Arc<PortalMap>>) -> MetadataReader {
        let parsed = moka::future::Cache::builder().max_capacity(PARSED).build();
        MetadataReader { namespace, data, portal, parsed }
    }

    /// The attributes of folder `folder` (one [`folder_of_node`] gave) from its sidecar, sorted
    /// by name, and whether it also has a database id (`user.cryoet.id`, not among them).
    async fn sidecar_attributes(&self, folder: &str) -> Result<(Attributes, Option<Kind>), NamespaceError> {
        let Some(level) = level_of(folder) else { return Ok((Vec::new(), None)) };
        let listing = self.namespace.listing(folder).await?;
        let mut attributes = match sidecar(level, &listing.entries) {
            None => Vec::new(),
            Some(object) => {
                let key = (object.key.clone(), object.etag.clone());
                let (data, object) = (self.data.clone(), object.clone());
                let parsed = self
                    .parsed
                    .try_get_with(key, async move {
                        let bytes = data.read_range(&object, 0..object.size).await?;
                        let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                        Ok::<_, crate::store::StoreError>(Arc::new(attributes(level, &json)))
                    })
                    .await
                    .map_err(|e| NamespaceError::Store((*e).clone()))?;
                parsed.as_ref().clone()
            }
        };
        attributes.sort();
        Ok((attributes, level.database_kind().filter(|_| self.portal.is_some())))
    }

    /// The names of the attributes of folder `folder`, sorted: no API call.
    pub async fn names(&self, folder: &str) -> Result<Vec<String>, NamespaceError> {
        let (attributes, database_kind) = self.sidecar_attributes(folder).await?;
        let mut names: Vec<String> = attributes.into_iter().map(|(name, _)| name).collect();
        if database_kind.is_some() {
            names.push(format!("{PREFIX}id"));
            names.sort();
        }
        Ok(names)
    }

    /// The value of attribute `name` of folder `folder`; for `user.cryoet.id` of an object with
    /// a database id, one API query (its answer kept like the id answers).
    pub async fn value(&self, folder: &str, name: &str) -> Result<Option<String>, NamespaceError> {
        let (attributes, database_kind) = self.sidecar_attributes(folder).await?;
        if let Some((_, value)) = attributes.into_iter().find(|(n, _)| n == name) {
            return Ok(Some(value));
        }
        let (Some(kind), Some(portal)) = (database_kind, &self.portal) else { return Ok(None) };
        if name.strip_prefix(PREFIX) != Some("id") {
            return Ok(None);
        }
        let Some((path, key)) = self.key_of_object(kind, folder).await? else { return Ok(None) };
        Ok(portal.identify(kind, folder, path, &key).await?)
    }

    /// The field of the API's row holding the key of the object of `kind` at `folder`, and that
    /// key: the folder of a run, the `<run>.mrc` (else `<run>.zarr`) of a tomogram or tilt
    /// series, the metadata file of an alignment or annotation.
    async fn key_of_object(&self, kind: Kind, folder: &str) -> Result<Option<(&'static str, String)>, NamespaceError> {
        let listing = match kind {
            Kind::Run => return Ok(Some(("s3Prefix", folder.to_owned()))),
            _ => self.namespace.listing(folder).await?,
        };
        let entries = &listing.entries;
        // The run's name is the key's second part (`<dataset>/<run>/...`).
        let run = folder.split('/').nth(1).unwrap_or_default();
        let found = |suffix: &str| {
            let name = format!("{run}{suffix}");
            entries.iter().filter(|e| e.name == name).find_map(|e| match &e.node {
                Node::File(object) => Some(object.key.clone()),
                Node::Dir { prefix } => Some(prefix.trim_end_matches('/').to_owned()),
                _ => None,
            })
        };
        Ok(match kind {
            Kind::Tomogram | Kind::TiltSeries => {
                found(".mrc").map(|key| ("s3MrcFile", key)).or_else(|| found(".zarr").map(|key| ("s3OmezarrDir", key)))
            }
            Kind::Alignment => sidecar(Level::Alignment, entries).map(|o| ("s3AlignmentMetadata", o.key.clone())),
            Kind::Annotation => sidecar(Level::Annotation, entries).map(|o| ("s3MetadataPath", o.key.clone())),
            Kind::Run | Kind::Dataset | Kind::Deposition => None,
        })
    }
}

/// The sidecar of a folder of `level`, among its `entries`.
fn sidecar(level: Level, entries: &[Entry]) -> Option<&Arc<ObjectMeta>> {
    entries.iter().find_map(|entry| {
        let Node::File(object) = &entry.node else { return None };
        let wanted = match level.sidecar() {
            Some(name) => entry.name == name,
            None => entry.name.ends_with(".json") && !entry.name.ends_with("_caption.json"),
        };
        wanted.then_some(object)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn levels_follow_the_key_layout() {
        assert_eq!(level_of("10000/"), Some(Level::Dataset));
        assert_eq!(level_of("10000/TS_026/"), Some(Level::Run));
        assert_eq!(level_of("10000/Images/"), None);
        assert_eq!(level_of("10000/TS_026/TiltSeries/100/"), Some(Level::TiltSeries));
        assert_eq!(level_of("10000/TS_026/Alignments/100/"), Some(Level::Alignment));
        assert_eq!(level_of("10000/TS_026/Reconstructions/VoxelSpacing13.480/Tomograms/100/"), Some(Level::Tomogram));
        assert_eq!(
            level_of("10000/TS_026/Reconstructions/VoxelSpacing13.480/Annotations/101/"),
            Some(Level::Annotation)
        );
        assert_eq!(level_of("depositions_metadata/10310/"), Some(Level::Deposition));
        for none in ["", "10000/TS_026/Frames/", "10000/TS_026/Reconstructions/", "x/", "depositions_metadata/"] {
            assert_eq!(level_of(none), None, "{none}");
        }
    }

    #[test]
    fn sidecar_fields_become_attributes() {
        let tomogram = json!({"voxel_spacing": 13.48, "size": {"x": 960, "y": 928, "z": 1000}, "processing": "raw",
                              "ctf_corrected": false, "reconstruction_method": "WBP", "reconstruction_software": null});
        let got = attributes(Level::Tomogram, &tomogram);
        let want: Vec<(String, String)> = [
            ("kind", "tomogram"),
            ("voxel_spacing", "13.48"),
            ("size", "960x928x1000"),
            ("reconstruction_method", "WBP"),
            ("processing", "raw"),
            ("ctf_corrected", "false"),
        ]
        .iter()
        .map(|(k, v)| (format!("{PREFIX}{k}"), v.to_string()))
        .collect();
        assert_eq!(got, want);
        let annotation = json!({"annotation_object": {"id": "GO:0016020", "name": "membrane"},
            "files": [{"shape": "SegmentationMask"}, {"shape": "SegmentationMask"}, {"shape": "Point"}]});
        let got = attributes(Level::Annotation, &annotation);
        assert!(got.contains(&(format!("{PREFIX}shape_type"), "SegmentationMask,Point".into())));
        let dataset = json!({"dataset_identifier": 10000, "organism": {"name": "S. pombe", "taxonomy_id": 4896}});
        let got = attributes(Level::Dataset, &dataset);
        assert!(got.contains(&(format!("{PREFIX}id"), "DS-10000".into())));
        assert!(got.contains(&(format!("{PREFIX}organism_taxid"), "4896".into())));
    }
}
