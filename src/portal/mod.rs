//! What cdpfs knows about the CryoET Data Portal itself: where the public bucket and its API
//! live, where the sections of its MRC files lie, and the portal's own map of the bucket (ids
//! as paths, metadata as extended attributes, facet folders, `cdpfs info`).
//!
//! Everything portal-specific is kept here so the rest of the code stays a generic, read-only
//! S3 filesystem that also serves site mirrors and private copies.
//!
//! - [`mrc`]: MRC headers and sections, for the read path;
//! - [`ids`]: portal ids (`RN-241`) as names, and keys as relative symlink targets;
//! - [`api`]: the GraphQL client (timeouts, retries, paging, a cap on requests in flight);
//! - [`batch`]: lookups (ids to keys, keys to ids) gathered into `_in` queries;
//! - [`answers`]: the API's answers kept in memory and in the cache directory;
//! - [`map`]: ids to keys and the facet folders, from those answers;
//! - [`metadata`]: `user.cryoet.*` attributes from the bucket's JSON sidecars;
//! - [`info`]: `cdpfs info`, a summary of any path of a mount.

pub mod answers;
pub mod api;
pub mod batch;
pub mod ids;
pub mod info;
pub mod map;
pub mod metadata;
pub mod mrc;

pub use mrc::MrcSections;

/// The portal's public bucket.
pub const DEFAULT_BUCKET: &str = "cryoet-data-portal-public";

/// The region the public bucket lives in.
pub const DEFAULT_REGION: &str = "us-west-2";
