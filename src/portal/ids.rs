//! The portal's ids as names (`DS-10000`, `RN-241`, `TM-621`, ...): which names are ids, and how a
//! key the portal gives for one becomes a relative symlink target in the mount.

use std::fmt;

use crate::namespace::names::child_name;

/// The kinds of object the portal names by id, with the prefix its web pages show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `DS-`: a dataset, the top folder `<id>/`.
    Dataset,
    /// `CZCDP-`: a deposition, `depositions_metadata/<id>/`.
    Deposition,
    /// `RN-`: a run folder.
    Run,
    /// `TM-`: a tomogram's `.mrc` (or its OME-Zarr when it has none).
    Tomogram,
    /// `TS-`: a tilt series' `.mrc` (or its OME-Zarr).
    TiltSeries,
    /// `AN-`: an annotation's folder.
    Annotation,
    /// `AL-`: an alignment's folder.
    Alignment,
}

const PREFIXES: [(&str, Kind); 7] = [
    ("DS-", Kind::Dataset),
    ("CZCDP-", Kind::Deposition),
    ("RN-", Kind::Run),
    ("TM-", Kind::Tomogram),
    ("TS-", Kind::TiltSeries),
    ("AN-", Kind::Annotation),
    ("AL-", Kind::Alignment),
];

/// One portal id, e.g. `RN-241`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortalId {
    /// What it names.
    pub kind: Kind,
    /// The database id (the API's ids are 32-bit `Int`s).
    pub number: i32,
}

impl PortalId {
    /// The id a name stands for: a known prefix, then a positive decimal number without leading
    /// zeros (so each id has exactly one name). Anything else is not an id.
    pub fn parse(name: &str) -> Option<PortalId> {
        let (prefix, kind) = PREFIXES.iter().find(|(prefix, _)| name.starts_with(prefix))?;
        let digits = &name[prefix.len()..];
        if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(PortalId { kind: *kind, number: digits.parse().ok()? })
    }

    /// The key (folder prefixes end in `/`) a dataset or deposition id names: these two need no
    /// API. `None` for the others.
    pub fn fixed_key(&self) -> Option<String> {
        match self.kind {
            Kind::Dataset => Some(format!("{}/", self.number)),
            Kind::Deposition => Some(format!("depositions_metadata/{}/", self.number)),
            _ => None,
        }
    }
}

impl fmt::Display for PortalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = PREFIXES.iter().find(|(_, kind)| *kind == self.kind).map_or("", |(prefix, _)| prefix);
        write!(f, "{prefix}{}", self.number)
    }
}

/// The bucket key in an `s3://<bucket>/<key>` URL the API answers with. The bucket is not
/// checked: a mirror keeps the portal's keys under its own bucket name.
pub fn key_of_url(url: &str) -> Option<String> {
    let (_bucket, key) = url.strip_prefix("s3://")?.split_once('/')?;
    (!key.is_empty()).then(|| key.to_owned())
}

/// The folder holding `key` (ending in `/`), e.g. an annotation's folder from its metadata file.
pub fn folder_of(key: &str) -> Option<String> {
    key.trim_end_matches('/').rfind('/').map(|i| key[..=i].to_owned())
}

/// The relative symlink target, from a link `depth` folders below the mount's root (which shows
/// `root_prefix`), to `key`; `None` when `key` lies outside the mount or is not a path the tree
/// shows (empty, `.` or `..` segments: an answer never leads out of the mount).
pub fn link_target(root_prefix: &str, depth: usize, key: &str) -> Option<String> {
    let inside = key.strip_prefix(root_prefix)?.trim_end_matches('/');
    if !inside.is_empty() && inside.split('/').any(|part| child_name("", part).is_none()) {
        return None;
    }
    let path = if inside.is_empty() { "." } else { inside };
    Some(format!("{}{path}", "../".repeat(depth)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_ids() {
        assert_eq!(PortalId::parse("RN-241"), Some(PortalId { kind: Kind::Run, number: 241 }));
        assert_eq!(PortalId::parse("CZCDP-10310").unwrap().fixed_key().unwrap(), "depositions_metadata/10310/");
        assert_eq!(PortalId::parse("DS-10000").unwrap().fixed_key().unwrap(), "10000/");
        assert_eq!(PortalId::parse("TM-621").unwrap().to_string(), "TM-621");
        for not_an_id in ["RN-", "RN-0241", "RN-24a", "rn-241", "RN-99999999999", "XX-1", "RN-+1", "10000"] {
            assert_eq!(PortalId::parse(not_an_id), None, "{not_an_id}");
        }
    }

    #[test]
    fn keys_and_link_targets() {
        let url =
            "s3://cryoet-data-portal-public/10000/TS_026/Reconstructions/VoxelSpacing13.480/Tomograms/100/TS_026.mrc";
        let key = key_of_url(url).unwrap();
        assert!(key.starts_with("10000/TS_026/"));
        assert_eq!(key_of_url("https://x/y"), None);
        assert_eq!(key_of_url("s3://bucket/"), None);
        assert_eq!(folder_of("10000/TS_026/A/100/membrane-1.0.json").unwrap(), "10000/TS_026/A/100/");
        assert_eq!(folder_of("10000/TS_026/").unwrap(), "10000/");
        assert_eq!(link_target("", 0, "10000/TS_026/").unwrap(), "10000/TS_026");
        assert_eq!(link_target("", 2, "10000/").unwrap(), "../../10000");
        assert_eq!(link_target("10000/", 0, "10000/TS_026/").unwrap(), "TS_026");
        assert_eq!(link_target("10000/", 0, "10000/").unwrap(), ".");
        assert_eq!(link_target("10001/", 0, "10000/TS_026/"), None);
        for bad in ["10000/../../etc/", "10000//TS_026/", "./10000/", "10000/.."] {
            assert_eq!(link_target("", 0, bad), None, "{bad}");
        }
    }
}
