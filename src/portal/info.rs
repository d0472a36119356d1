//! `cdpfs info PATH`: what a file or folder of a mount is, in the portal's terms. It reads the
//! `user.cryoet.*` attributes through the mount (so it shows exactly what the mount serves),
//! of the path and of the folders with metadata below it (tomograms, tilt series, alignments,
//! annotations; a dataset's runs), skipping the bulky folders no metadata lives in.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::metadata::PREFIX;

/// How deep below the path folders are looked at (a run's tomograms are four levels down).
const DEPTH: usize = 4;
/// Most folders looked at below the path.
const MAX_FOLDERS: usize = 400;
/// Folders that hold data, not metadata.
const SKIPPED: [&str; 4] = ["Frames", "Gains", "Images", "NeuroglancerPrecompute"];

/// What `info` found at one path.
#[derive(Serialize)]
struct Described {
    /// The path, relative to the path asked about (`.` for itself).
    path: String,
    /// `user.cryoet.*` attributes, without the prefix.
    metadata: BTreeMap<String, String>,
    /// MRC files directly in the folder, with their sizes.
    files: Vec<(String, u64)>,
}

#[derive(Serialize)]
struct Report {
    /// The path asked about, symlinks resolved.
    path: PathBuf,
    /// Its key in the bucket (a folder's without the final `/`; an MRC view's is the Zarr
    /// level it shows, ending in `/`); none for what the mount adds (facet folders).
    key: Option<String>,
    /// What it is: the portal's kind (`run`, `tomogram`, ...) where its metadata says, else
    /// `folder`, `file` or `MRC view`.
    kind: String,
    /// `user.cryoet.*` attributes, without the prefix.
    metadata: BTreeMap<String, String>,
    /// MRC files directly in the folder, with their sizes.
    files: Vec<(String, u64)>,
    /// Folders with metadata below it.
    contents: Vec<Described>,
    /// Whether the walk stopped at its bound of folders.
    truncated: bool,
}

/// Prints what `path` (under a cdpfs mount) is; as JSON with `json`.
pub fn show(path: &Path, json: bool) -> Result<()> {
    let report = describe(path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let title = |kind: &str, metadata: &BTreeMap<String, String>| {
        let id = metadata.get("id").map(|id| format!(" {id}")).unwrap_or_default();
        format!("{kind}{id}")
    };
    println!("{}  ({})", report.path.display(), title(&report.kind, &report.metadata));
    println!("  key: {}", report.key.as_deref().unwrap_or("(none: the mount's, not the bucket's)"));
    for (name, value) in report.metadata.iter().filter(|(n, _)| *n != "kind" && *n != "id") {
        println!("  {name}: {value}");
    }
    print_files(&report.files, "  ");
    for item in &report.contents {
        println!(
            "{}  ({})",
            item.path,
            title(item.metadata.get("kind").map_or("folder", String::as_str), &item.metadata)
        );
        let fields: Vec<String> = item
            .metadata
            .iter()
            .filter(|(n, _)| *n != "kind" && *n != "id")
            .map(|(name, value)| format!("{name}: {value}"))
            .collect();
        if !fields.is_empty() {
            println!("    {}", fields.join(" | "));
        }
        print_files(&item.files, "    ");
    }
    if report.truncated {
        println!("(more folders below not shown)");
    }
    Ok(())
}

fn print_files(files: &[(String, u64)], indent: &str) {
    for (name, size) in files {
        println!("{indent}{name}  {size} bytes");
    }
}

fn describe(path: &Path) -> Result<Report> {
    let path = fs::canonicalize(path).with_context(|| format!("cannot open {}", path.display()))?;
    if !crate::mount_table::under_a_cdpfs_mount(&path)? {
        bail!("{} is not under a cdpfs mount", path.display());
    }
    // The mount says where in the bucket a path is (a mount of a `--prefix` starts below the
    // bucket's root); what the mount adds (a facet folder) has no key.
    let key = match crate::stage::xattr(&path, "user.cdpfs.key") {
        Ok(key) if path.is_dir() => Some(key.trim_end_matches('/').to_owned()),
        Ok(key) => Some(key),
        Err(_) => None,
    };
    let this = folder(&path, ".")?;
    let kind = match this.metadata.get("kind") {
        Some(kind) => kind.clone(),
        None if path.is_dir() => "folder".into(),
        // A view's key is the level's folder.
        None if key.as_ref().is_some_and(|key| key.ends_with('/')) => "MRC view".into(),
        None => "file".into(),
    };
    let mut contents = Vec::new();
    let mut truncated = false;
    if path.is_dir() {
        // A dataset's runs, one level down; below anything else, its metadata folders.
        let depth = if this.metadata.get("kind").is_some_and(|k| k == "dataset") { 1 } else { DEPTH };
        let mut frontier = vec![(path.clone(), String::new())];
        let mut seen = 0;
        for _ in 0..depth {
            let mut next = Vec::new();
            for (dir, rel) in frontier {
                for entry in sorted_entries(&dir)? {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !entry.file_type()?.is_dir() || SKIPPED.contains(&name.as_str()) || name.ends_with(".zarr") {
                        continue;
                    }
                    seen += 1;
                    if seen > MAX_FOLDERS {
                        truncated = true;
                        break;
                    }
                    let rel = if rel.is_empty() { name } else { format!("{rel}/{name}") };
                    let found = folder(&entry.path(), &rel)?;
                    if !found.metadata.is_empty() {
                        contents.push(found);
                    }
                    next.push((entry.path(), rel));
                }
            }
            frontier = next;
        }
    }
    contents.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Report { path, key, kind, metadata: this.metadata, files: this.files, contents, truncated })
}

fn sorted_entries(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    let mut entries: Vec<fs::DirEntry> =
        fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}

/// The metadata of `path` and, for a folder with metadata, its MRC files.
fn folder(path: &Path, rel: &str) -> Result<Described> {
    let mut metadata = BTreeMap::new();
    for name in xattr_names(path).with_context(|| format!("reading the attributes of {}", path.display()))? {
        let Some(short) = name.strip_prefix(PREFIX) else { continue };
        match crate::stage::xattr(path, &name) {
            Ok(value) => {
                metadata.insert(short.to_owned(), value);
            }
            // A database id comes from the portal's API, which may be down: shown without it.
            Err(_) if short == "id" => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut files = Vec::new();
    if path.is_dir() && !metadata.is_empty() {
        for entry in sorted_entries(path)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if crate::portal::MrcSections::is_mrc(&name) {
                files.push((name, entry.metadata()?.len()));
            }
        }
    }
    Ok(Described { path: rel.to_owned(), metadata, files })
}

/// The names of the extended attributes of `path`.
fn xattr_names(path: &Path) -> std::io::Result<Vec<String>> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: the path is NUL-terminated and the buffer is valid for its length.
    let n = unsafe { libc::listxattr(c_path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf.split(|b| *b == 0).filter(|n| !n.is_empty()).map(|n| String::from_utf8_lossy(n).into_owned()).collect())
}
