//! What cdpfs knows about the CryoET Data Portal itself: where the public bucket lives.
//!
//! Everything portal-specific is kept here so the rest of the code stays a generic, read-only
//! S3 filesystem that also serves site mirrors and private copies.

/// The portal's public bucket.
pub const DEFAULT_BUCKET: &str = "cryoet-data-portal-public";

/// The region the public bucket lives in.
pub const DEFAULT_REGION: &str = "us-west-2";
