//! cdpfs: the CryoET Data Portal's S3 bucket as a read-only FUSE filesystem.
//!
//! Layers, each in its own module:
//! - [`store`]: the object-store client (listing, ranged ETag-pinned GETs, retries);
//! - [`namespace`]: inodes, key-to-name mapping and the directory cache;
//! - [`cache`]: the block cache (memory and persistent disk tiers);
//! - [`data`]: the read path from a file range to object bytes, with prefetch;
//! - [`views`]: virtual binned MRC files computed from OME-Zarr pyramid levels;
//! - [`fuse`]: the thin FUSE adapter;
//! - [`mount`]: the mount lifecycle (checks, background start, signals, unmount);
//! - [`mount_table`]: what is mounted where;
//! - [`fstab`]: the `mount.cdpfs` helper for `mount(8)` and fstab;
//! - [`stats`]: counters of a running mount (`cdpfs stats`, Prometheus);
//! - [`stage`]: `cdpfs prefetch`, staging files into a mount's cache;
//! - [`portal`]: what is specific to the CryoET Data Portal (MRC sections, and its map of the
//!   bucket: ids as paths, metadata attributes, facet folders, `cdpfs info`).
//!
//! The `cdpfs` binary (`main.rs`) is only the command line on top.

pub mod cache;
pub mod data;
pub mod fstab;
pub mod fuse;
pub mod hash;
pub mod mount;
pub mod mount_table;
pub mod namespace;
pub mod portal;
pub mod stage;
pub mod stats;
pub mod store;
pub mod views;
