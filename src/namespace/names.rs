//! Key-to-name mapping: which bucket keys become which directory entries.
//!
//! S3 keys are arbitrary strings; file names are not. A key segment becomes a name only when it
//! is a valid, harmless POSIX name (not empty, not `.` or `..`, no `/` or NUL, at most 255
//! bytes). Anything else is left out of the tree, so nothing can ever resolve outside the
//! mount. When a prefix and an object have the same name, the directory wins (the data under it
//! stays reachable) and the object is hidden. The result is deterministic: sorted by name.

use crate::store::{ObjectMeta, PrefixListing};

/// Longest name Linux accepts for one path component.
pub const MAX_NAME_BYTES: usize = 255;

/// One entry of a directory, before inode numbers are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Child {
    /// A sub-directory backed by a common prefix (the full prefix, ending in `/`).
    Dir { name: String, prefix: String },
    /// A file backed by one object.
    File { name: String, object: ObjectMeta },
}

impl Child {
    /// The entry's name inside its directory.
    pub fn name(&self) -> &str {
        match self {
            Child::Dir { name, .. } | Child::File { name, .. } => name,
        }
    }
}

/// The name `full` (a key, or a common prefix ending in `/`) takes inside `parent_prefix`,
/// or `None` when it cannot be shown.
pub fn child_name<'a>(parent_prefix: &str, full: &'a str) -> Option<&'a str> {
    let rest = full.strip_prefix(parent_prefix)?;
    let name = rest.strip_suffix('/').unwrap_or(rest);
    let valid = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && name.len() <= MAX_NAME_BYTES;
    valid.then_some(name)
}

/// Turns one listing of `parent_prefix` into its directory entries, sorted by name.
pub fn children(parent_prefix: &str, listing: PrefixListing) -> Vec<Child> {
    let mut entries: Vec<Child> = Vec::with_capacity(listing.prefixes.len() + listing.objects.len());
    for prefix in listing.prefixes {
        if let Some(name) = child_name(parent_prefix, &prefix) {
            entries.push(Child::Dir { name: name.to_owned(), prefix: prefix.clone() });
        }
    }
    for object in listing.objects {
        // A key equal to the prefix itself ("folder marker" objects) or ending in '/' is not a file.
        if object.key.ends_with('/') {
            continue;
        }
        if let Some(name) = child_name(parent_prefix, &object.key) {
            entries.push(Child::File { name: name.to_owned(), object: object.clone() });
        }
    }
    // Directories sort before files of the same name, so dedup keeps the directory.
    entries.sort_by(|a, b| {
        a.name().cmp(b.name()).then_with(|| matches!(b, Child::Dir { .. }).cmp(&matches!(a, Child::Dir { .. })))
    });
    entries.dedup_by(|later, earlier| later.name() == earlier.name());
    entries
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn object(key: &str) -> ObjectMeta {
        ObjectMeta { key: key.into(), size: 1, etag: "\"e\"".into(), mtime: SystemTime::UNIX_EPOCH }
    }

    fn names(entries: &[Child]) -> Vec<(&str, bool)> {
        entries.iter().map(|c| (c.name(), matches!(c, Child::Dir { .. }))).collect()
    }

    #[test]
    fn plain_names_pass_through() {
        assert_eq!(child_name("a/", "a/b.mrc"), Some("b.mrc"));
        assert_eq!(child_name("a/", "a/b/"), Some("b"));
        assert_eq!(child_name("", "10000/"), Some("10000"));
        assert_eq!(child_name("a/", "a/with space é.json"), Some("with space é.json"));
    }

    #[test]
    fn unrepresentable_names_are_dropped() {
        assert_eq!(child_name("a/", "a/"), None);
        assert_eq!(child_name("a/", "a//"), None);
        assert_eq!(child_name("a/", "a/./"), None);
        assert_eq!(child_name("a/", "a/.."), None);
        assert_eq!(child_name("a/", "a/x\0y"), None);
        assert_eq!(child_name("a/", "b/c"), None);
        assert_eq!(child_name("a/", &format!("a/{}", "x".repeat(256))), None);
        assert_eq!(child_name("a/", &format!("a/{}", "x".repeat(255))).map(str::len), Some(255));
    }

    #[test]
    fn directory_shadows_file_of_same_name_and_order_is_sorted() {
        let listing = PrefixListing {
            prefixes: vec!["p/z/".into(), "p/same/".into(), "p//".into()],
            objects: vec![object("p/same"), object("p/a.json"), object("p/"), object("p/..")],
        };
        let entries = children("p/", listing);
        assert_eq!(names(&entries), vec![("a.json", false), ("same", true), ("z", true)]);
    }

    #[test]
    fn result_does_not_depend_on_input_order() {
        let a = PrefixListing { prefixes: vec!["x/".into()], objects: vec![object("x"), object("b")] };
        let b = PrefixListing { prefixes: vec!["x/".into()], objects: vec![object("b"), object("x")] };
        assert_eq!(children("", a), children("", b));
    }

    proptest::proptest! {
        /// Whatever the keys, a shown name is a single, harmless path component, and a listing
        /// gives sorted, unique names.
        #[test]
        fn any_key_maps_to_a_safe_name_or_none(
            parent in "[a-z/]{0,6}",
            rest in proptest::collection::vec("(\\PC|/|\\.|\\x00){0,12}", 0..20),
        ) {
            let parent = if parent.is_empty() || parent.ends_with('/') { parent } else { format!("{parent}/") };
            let keys: Vec<String> = rest.iter().map(|r| format!("{parent}{r}")).collect();
            for key in &keys {
                if let Some(name) = child_name(&parent, key) {
                    proptest::prop_assert!(!name.is_empty() && name != "." && name != "..");
                    proptest::prop_assert!(!name.contains('/') && !name.contains('\0'));
                    proptest::prop_assert!(name.len() <= MAX_NAME_BYTES);
                }
            }
            let listing = PrefixListing {
                prefixes: keys.iter().filter(|k| k.ends_with('/')).cloned().collect(),
                objects: keys.iter().filter(|k| !k.ends_with('/')).map(|k| object(k)).collect(),
            };
            let entries = children(&parent, listing);
            let names: Vec<&str> = entries.iter().map(Child::name).collect();
            proptest::prop_assert!(names.windows(2).all(|w| w[0] < w[1]), "not sorted and unique: {:?}", names);
        }
    }
}
