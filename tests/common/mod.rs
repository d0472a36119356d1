//! Shared test harness: a real S3 server (s3s-fs) on 127.0.0.1 holding a generated,
//! portal-shaped fixture, and helpers that mount it with the real `cdpfs` binary.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod slowfs;

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Bucket name used by the fixture.
pub const BUCKET: &str = "portal";

/// Where the example tomogram lives in the fixture.
pub const TOMO_DIR: &str = "10000/TS_026/Reconstructions/VoxelSpacing13.480/Tomograms/100";

/// MRC dimensions of the example tomogram (x, y, z).
pub const TOMO_SHAPE: (usize, usize, usize) = (320, 320, 80);

/// Number of entries in the large directory.
pub const FRAMES: usize = 1100;

/// The generated bucket: keys and their exact bytes, stored under `root/BUCKET`.
pub struct Fixture {
    /// The s3s-fs root (the bucket is the `BUCKET` subdirectory).
    pub root: PathBuf,
    /// Every key with its bytes.
    pub objects: BTreeMap<String, Vec<u8>>,
}

impl Fixture {
    /// The source file behind `key`.
    pub fn path(&self, key: &str) -> PathBuf {
        self.root.join(BUCKET).join(key)
    }
}

/// Faults the test server injects into every request kind: listing pages (ListObjectsV2), GETs
/// of small metadata (`.zattrs`, `.zarray`, JSON) and data GETs alike.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Per mille of requests answered `503 SlowDown`.
    pub slow_down: u64,
    /// Per mille of requests answered `500 InternalError`.
    pub internal_error: u64,
    /// Per mille of requests whose connection breaks after half of the body was sent.
    pub reset_mid_body: u64,
    /// Per mille of requests answered 200 with the full `Content-Length` but half the body, then
    /// the connection is closed.
    pub truncated: u64,
    /// Every request for a key (or listing prefix) containing one of these texts gets this
    /// status (500: "server down" for it; 403: refused; 404: gone; 412: replaced).
    pub always: &'static [(&'static str, u16)],
    /// The first request for a key (or listing prefix) containing this text sends half its
    /// body, then goes silent.
    pub stall_first: Option<&'static str>,
    /// The first answer to every distinct request (URL and range: each listing page, each GET)
    /// is a complete 200 whose body is a proxy's HTML error page (no listing XML, not the
    /// range's bytes); the retry is answered right.
    pub garble_every_first_answer: bool,
    /// A mirror without ETags: listings carry none, GET answers have no `ETag` header, and an
    /// `If-Match` can never match (412). Otherwise listings carry each object's ETag, as S3's do.
    pub no_etags: bool,
}

enum Fault {
    Status(u16, &'static str),
    ResetMidBody,
    TruncatedBody,
    GarbledBody,
    StallMidBody,
}

impl Faults {
    /// The fault for request number `n`, of `key`, if any; deterministic, so runs repeat.
    fn pick(&self, n: u64, key: &str, stalled: &AtomicBool) -> Option<Fault> {
        if self.stall_first.is_some_and(|needle| key.contains(needle)) && !stalled.swap(true, Ordering::SeqCst) {
            return Some(Fault::StallMidBody);
        }
        if let Some(&(_, status)) = self.always.iter().find(|(needle, _)| key.contains(needle)) {
            let code = match status {
                403 => "AccessDenied",
                404 => "NoSuchKey",
                412 => "PreconditionFailed",
                503 => "SlowDown",
                _ => "InternalError",
            };
            return Some(Fault::Status(status, code));
        }
        let roll = cdpfs::hash::stable_hash(&[&n.to_le_bytes()]) % 1000;
        let mut bound = 0;
        let mut next = |per_mille: u64| {
            bound += per_mille;
            roll < bound
        };
        if next(self.slow_down) {
            Some(Fault::Status(503, "SlowDown"))
        } else if next(self.internal_error) {
            Some(Fault::Status(500, "InternalError"))
        } else if next(self.reset_mid_body) {
            Some(Fault::ResetMidBody)
        } else if next(self.truncated) {
            Some(Fault::TruncatedBody)
        } else {
            None
        }
    }
}

type TestBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, s3s::StdError>;

/// A running test S3 server.
pub struct Server {
    /// Its address.
    pub addr: SocketAddr,
    /// Object GETs served so far.
    pub gets: Arc<AtomicU64>,
    /// Body bytes of those GETs.
    pub bytes: Arc<AtomicU64>,
    /// Listing pages served whole so far.
    pub lists: Arc<AtomicU64>,
    /// Faults injected so far (into any request).
    pub injected: Arc<AtomicU64>,
    /// Of those, the faults injected into listing pages.
    pub injected_lists: Arc<AtomicU64>,
    /// "path range" of every successful object GET, in order.
    pub served: Arc<std::sync::Mutex<Vec<String>>>,
    /// How many requests each key (or listing prefix) matched by `Faults::always` was failed.
    pub always_failed: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    /// Clear to stop failing the `Faults::always` keys (the server "recovers").
    pub always_on: Arc<AtomicBool>,
}

impl Server {
    /// The endpoint URL to pass to `--endpoint-url`.
    pub fn addr_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The fixture and the server, created once per test binary.
pub fn shared() -> &'static (Fixture, Server) {
    static SHARED: OnceLock<(Fixture, Server)> = OnceLock::new();
    SHARED.get_or_init(|| {
        remove_stale_scratch_dirs();
        let root = scratch_dir("fixture");
        let fixture = build_fixture(&root);
        let server = start_server(&root, Faults::default());
        (fixture, server)
    })
}

/// A fresh, empty directory under cargo's per-target temp dir, its own for every call: tests of
/// one process run in parallel threads and may ask for the same name (the pid stays last, for
/// `remove_stale_scratch_dirs`).
pub fn scratch_dir(name: &str) -> PathBuf {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{call}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes scratch dirs left by earlier test processes that are gone (never a live mount).
fn remove_stale_scratch_dirs() {
    let Ok(entries) = fs::read_dir(env!("CARGO_TARGET_TMPDIR")) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() && !is_mounted(&entry.path()) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// What the server's request handler shares between connections.
#[derive(Clone)]
struct ServerState {
    root: PathBuf,
    faults: Faults,
    gets: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    lists: Arc<AtomicU64>,
    injected: Arc<AtomicU64>,
    injected_lists: Arc<AtomicU64>,
    served: Arc<std::sync::Mutex<Vec<String>>>,
    always_failed: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    always_on: Arc<AtomicBool>,
    answered: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    requests: Arc<AtomicU64>,
    stalled: Arc<AtomicBool>,
}

/// Starts s3s-fs serving `root` on 127.0.0.1 in a background thread, injecting `faults`.
pub fn start_server(root: &Path, faults: Faults) -> Server {
    start_server_with(root, faults, None)
}

/// The same, checking the SigV4 signature of every signed request against one access key and
/// secret (`credentials`).
pub fn start_server_with(root: &Path, faults: Faults, credentials: Option<(&'static str, &'static str)>) -> Server {
    let root = root.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    let state = ServerState {
        root: root.clone(),
        faults,
        gets: Arc::default(),
        bytes: Arc::default(),
        lists: Arc::default(),
        injected: Arc::default(),
        injected_lists: Arc::default(),
        served: Arc::default(),
        always_failed: Arc::default(),
        always_on: Arc::new(AtomicBool::new(true)),
        answered: Arc::default(),
        requests: Arc::default(),
        stalled: Arc::default(),
    };
    let shared = state.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let fs = s3s_fs::FileSystem::new(root).unwrap();
            let mut service = s3s::service::S3ServiceBuilder::new(fs);
            if let Some((key, secret)) = credentials {
                service.set_auth(s3s::auth::SimpleAuth::from_single(key, secret));
            }
            let service = service.build();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let Ok((socket, _)) = listener.accept().await else { continue };
                let (service, state) = (service.clone(), state.clone());
                let handler = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    serve_request(service.clone(), state.clone(), req)
                });
                tokio::spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(socket), handler).await;
                });
            }
        });
    });
    Server {
        addr: rx.recv().unwrap(),
        gets: shared.gets,
        bytes: shared.bytes,
        lists: shared.lists,
        injected: shared.injected,
        injected_lists: shared.injected_lists,
        served: shared.served,
        always_failed: shared.always_failed,
        always_on: shared.always_on,
    }
}

/// One request through s3s-fs: counts object GETs (not listings) and their body bytes as the
/// origin sees them, answers `If-Match` and lists ETags (s3s-fs does neither), and injects the
/// configured faults into any request, listings included.
async fn serve_request(
    service: s3s::service::S3Service,
    state: ServerState,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<TestBody>, s3s::HttpError> {
    let query = req.uri().query().unwrap_or("").to_owned();
    let listing = query.contains("list-type");
    let object_get = req.method() == "GET" && !listing;
    let range = req.headers().get("range").and_then(|v| v.to_str().ok()).unwrap_or("all");
    let request_line = format!("{} {range}", req.uri().path());
    let if_match = req.headers().get("if-match").map(|v| v.as_bytes().to_vec());
    // A listing's "key" is its prefix, for `always` and `stall_first`.
    let key = if listing {
        query.split('&').find_map(|pair| pair.strip_prefix("prefix=")).map(percent_decode).unwrap_or_default()
    } else {
        percent_decode(req.uri().path())
    };
    let mut faults = state.faults;
    if !state.always_on.load(Ordering::SeqCst) {
        faults.always = &[];
    }
    let first_time = || state.answered.lock().unwrap().insert(format!("{} {range}", req.uri()));
    let fault = if !(object_get || listing) {
        None
    } else if faults.garble_every_first_answer && first_time() {
        Some(Fault::GarbledBody)
    } else {
        faults.pick(state.requests.fetch_add(1, Ordering::SeqCst), &key, &state.stalled)
    };
    let injected = || {
        state.injected.fetch_add(1, Ordering::SeqCst);
        if listing {
            state.injected_lists.fetch_add(1, Ordering::SeqCst);
        }
    };
    if let Some(Fault::Status(status, code)) = fault {
        injected();
        if faults.always.iter().any(|(needle, _)| key.contains(needle)) {
            *state.always_failed.lock().unwrap().entry(key).or_default() += 1;
        }
        return Ok(error_response(status, code));
    }
    let response = service.call(req.map(s3s::Body::from)).await?;
    let (mut parts, body) = response.into_parts();
    if object_get && parts.status.is_success() {
        if let Some(wanted) = if_match {
            let current = parts.headers.get("etag").map(|v| v.as_bytes().to_vec());
            if faults.no_etags || current.as_deref() != Some(&wanted[..]) {
                return Ok(error_response(412, "PreconditionFailed"));
            }
        }
        state.gets.fetch_add(1, Ordering::SeqCst);
        state.served.lock().unwrap().push(request_line);
        let length = parts.headers.get("content-length").and_then(|v| v.to_str().ok());
        state.bytes.fetch_add(length.and_then(|v| v.parse().ok()).unwrap_or(0), Ordering::SeqCst);
    }
    let body_fault = fault.filter(|_| parts.status.is_success());
    let add_etags = listing && parts.status.is_success() && !faults.no_etags;
    if faults.no_etags {
        parts.headers.remove("etag");
    }
    if !add_etags && body_fault.is_none() {
        if listing && parts.status.is_success() {
            state.lists.fetch_add(1, Ordering::SeqCst);
        }
        return Ok(hyper::Response::from_parts(parts, http_body_util::BodyExt::boxed_unsync(body)));
    }
    let mut all = http_body_util::BodyExt::collect(body).await.map_err(s3s::HttpError::new)?.to_bytes();
    if add_etags {
        all = with_etags(&all, &state.root).into();
    }
    // Every body below is announced whole, whatever reaches the client.
    parts.headers.insert("content-length", all.len().into());
    let (half, rest) = (all.slice(..all.len() / 2), all.slice(all.len() / 2..));
    let frames = |tail: Option<s3s::StdError>| {
        let mut frames: Vec<Result<http_body::Frame<bytes::Bytes>, s3s::StdError>> =
            vec![Ok(http_body::Frame::data(half.clone()))];
        frames.extend(tail.map(Err));
        http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(futures_util::stream::iter(frames)))
    };
    let whole = |bytes: bytes::Bytes| -> TestBody {
        http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(http_body_util::Full::new(bytes), |e| {
            match e {}
        }))
    };
    let body: TestBody = match body_fault {
        None => {
            if listing {
                state.lists.fetch_add(1, Ordering::SeqCst);
            }
            whole(all)
        }
        // A complete message, but not what was asked for.
        Some(Fault::GarbledBody) => {
            injected();
            let page = bytes::Bytes::from_static(b"<html><body><h1>502 Bad Gateway</h1></body></html>");
            for header in ["etag", "content-range", "last-modified"] {
                parts.headers.remove(header);
            }
            parts.headers.insert("content-length", page.len().into());
            parts.headers.insert("content-type", "text/html".parse().unwrap());
            whole(page)
        }
        Some(Fault::ResetMidBody) => {
            injected();
            frames(Some("injected reset".into()))
        }
        // Half the announced bytes, then the end: hyper closes the connection short.
        Some(Fault::TruncatedBody) => {
            injected();
            frames(None)
        }
        Some(Fault::StallMidBody) => {
            injected();
            let first = futures_util::stream::once(async move { Ok::<_, s3s::StdError>(http_body::Frame::data(half)) });
            let late = futures_util::stream::once(async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<_, s3s::StdError>(http_body::Frame::data(rest))
            });
            let stream = futures_util::StreamExt::chain(first, late);
            http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(stream))
        }
        Some(Fault::Status(..)) => unreachable!("answered before the request reached s3s-fs"),
    };
    Ok(hyper::Response::from_parts(parts, body))
}

/// An S3 error answer.
fn error_response(status: u16, code: &str) -> hyper::Response<TestBody> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected</Message></Error>"
    );
    let body = http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(
        http_body_util::Full::new(bytes::Bytes::from(xml)),
        |e| match e {},
    ));
    hyper::Response::builder().status(status).body(body).unwrap()
}

/// A ListObjectsV2 answer with each object's ETag (as the object's GET answers it) added.
fn with_etags(xml: &[u8], root: &Path) -> Vec<u8> {
    let text = String::from_utf8_lossy(xml);
    let mut out = String::with_capacity(text.len() * 2);
    let mut rest = &text[..];
    while let Some(end) = rest.find("</Key>") {
        let (before, after) = rest.split_at(end + "</Key>".len());
        out.push_str(before);
        let key = before.rfind("<Key>").map(|start| xml_unescape(&before[start + "<Key>".len()..end]));
        if let Some(etag) = key.and_then(|key| etag_of(root, &key)) {
            out.push_str(&format!("<ETag>\"{etag}\"</ETag>"));
        }
        rest = after;
    }
    out.push_str(rest);
    out.into_bytes()
}

fn xml_unescape(text: &str) -> String {
    text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&apos;", "'").replace("&amp;", "&")
}

/// Where s3s-fs keeps the ETag of `key` (it re-hashes the file on every request without it).
fn sidecar(root: &Path, key: &str) -> PathBuf {
    let encode = |s: &str| base64_simd::URL_SAFE_NO_PAD.encode_to_string(s);
    root.join(format!(".bucket-{}.object-{}.internal.json", encode(BUCKET), encode(key)))
}

/// The ETag (unquoted) s3s-fs answers for `key`, when it has one saved.
fn etag_of(root: &Path, key: &str) -> Option<String> {
    let saved: serde_json::Value = serde_json::from_slice(&fs::read(sidecar(root, key)).ok()?).ok()?;
    saved.get("e_tag")?.as_str().map(str::to_owned)
}

/// Decodes `%XX` escapes in a request path.
fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(value)) => {
                out.push(value);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Deterministic pseudo-random bytes (xorshift), so a misplaced byte never goes unnoticed.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// float32 voxels from a seed, finite and in [-0.5, 0.5).
fn voxels(seed: u64, count: usize) -> Vec<f32> {
    noise(seed, count * 4)
        .chunks_exact(4)
        .map(|c| (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
        .collect()
}

/// A valid MRC2014 file: 1024-byte header, float32 data, x fastest.
pub fn mrc_bytes(shape: (usize, usize, usize), voxel_size: f32, seed: u64) -> Vec<u8> {
    let (nx, ny, nz) = shape;
    let data = voxels(seed, nx * ny * nz);
    let (min, max) = data.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let mean = (data.iter().map(|&v| f64::from(v)).sum::<f64>() / data.len() as f64) as f32;
    let rms = (data.iter().map(|&v| f64::from(v - mean).powi(2)).sum::<f64>() / data.len() as f64).sqrt() as f32;
    let mut header = vec![0u8; 1024];
    let mut put_i32 = |offset: usize, v: i32| header[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    for (i, n) in [nx, ny, nz].iter().enumerate() {
        put_i32(i * 4, *n as i32); // nx ny nz
        put_i32(28 + i * 4, *n as i32); // mx my mz
    }
    put_i32(12, 2); // mode: float32
    put_i32(64, 1);
    put_i32(68, 2);
    put_i32(72, 3); // mapc mapr maps
    put_i32(88, 1); // ispg: volume
    put_i32(108, 20140); // nversion
    put_i32(220, 1); // nlabl
    let mut put_f32 = |offset: usize, v: f32| header[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    for (i, n) in [nx, ny, nz].iter().enumerate() {
        put_f32(40 + i * 4, *n as f32 * voxel_size); // cella
        put_f32(52 + i * 4, 90.0); // cellb
    }
    put_f32(76, min);
    put_f32(80, max);
    put_f32(84, mean);
    put_f32(216, rms);
    header[104..108].copy_from_slice(b"MRCO");
    header[208..212].copy_from_slice(b"MAP ");
    header[212..216].copy_from_slice(&[0x44, 0x44, 0, 0]);
    let label = b"cdpfs test fixture";
    header[224..224 + label.len()].copy_from_slice(label);
    let mut out = header;
    out.reserve(data.len() * 4);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// One OME-Zarr v2 pyramid (uncompressed chunks, nested `/` keys) under `base`.
fn add_zarr(objects: &mut BTreeMap<String, Vec<u8>>, base: &str, shape: [usize; 3], chunk: [usize; 3], seed: u64) {
    objects.insert(format!("{base}/.zgroup"), br#"{"zarr_format": 2}"#.to_vec());
    let scales: Vec<String> = (0..3)
        .map(|l| {
            let s = 13.48 * f64::from(1u32 << l);
            format!(
                r#"{{"path": "{l}", "coordinateTransformations": [{{"type": "scale", "scale": [{s}, {s}, {s}]}}]}}"#
            )
        })
        .collect();
    let zattrs = format!(
        r#"{{"multiscales": [{{"version": "0.4", "name": "/", "axes": [{{"name": "z", "type": "space", "unit": "angstrom"}}, {{"name": "y", "type": "space", "unit": "angstrom"}}, {{"name": "x", "type": "space", "unit": "angstrom"}}], "datasets": [{}]}}]}}"#,
        scales.join(", ")
    );
    objects.insert(format!("{base}/.zattrs"), zattrs.into_bytes());
    for level in 0..3usize {
        let dims: Vec<usize> = shape.iter().map(|d| (d >> level).max(1)).collect();
        let chunks: Vec<usize> = chunk.iter().zip(&dims).map(|(c, d)| (*c).min(*d)).collect();
        let zarray = format!(
            r#"{{"zarr_format": 2, "shape": [{}, {}, {}], "chunks": [{}, {}, {}], "dtype": "<f4", "compressor": null, "fill_value": 0, "order": "C", "filters": null, "dimension_separator": "/"}}"#,
            dims[0], dims[1], dims[2], chunks[0], chunks[1], chunks[2]
        );
        objects.insert(format!("{base}/{level}/.zarray"), zarray.into_bytes());
        let counts: Vec<usize> = dims.iter().zip(&chunks).map(|(d, c)| d.div_ceil(*c)).collect();
        for z in 0..counts[0] {
            for y in 0..counts[1] {
                for x in 0..counts[2] {
                    let n = chunks.iter().product::<usize>();
                    let bytes: Vec<u8> = voxels(seed + (level * 1000 + z * 100 + y * 10 + x) as u64, n)
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect();
                    objects.insert(format!("{base}/{level}/{z}/{y}/{x}"), bytes);
                }
            }
        }
    }
}

fn json(fields: &[(&str, &str)]) -> Vec<u8> {
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("    \"{k}\": {v}")).collect();
    format!("{{\n{}\n}}", body.join(",\n")).into_bytes()
}

/// Generates the portal-shaped bucket and writes it where s3s-fs serves it from.
pub fn build_fixture(root: &Path) -> Fixture {
    let mut objects = BTreeMap::new();
    let standard = [("deposition_id", "10310"), ("last_updated_at", "1716000000")];
    for (dataset, title) in [("10000", "\"Whole-cell tomograms\""), ("10001", "\"Ribosomes in situ\"")] {
        let id = dataset;
        objects.insert(
            format!("{dataset}/dataset_metadata.json"),
            json(&[("dataset_identifier", id), ("dataset_title", title), standard[0], standard[1]]),
        );
    }
    for run in ["TS_026", "TS with space", "Ünïcode_run_é"] {
        objects.insert(
            format!("10000/{run}/run_metadata.json"),
            json(&[("run_name", &format!("\"{run}\"")), standard[0], standard[1]]),
        );
    }
    objects.insert(format!("{TOMO_DIR}/TS_026.mrc"), mrc_bytes(TOMO_SHAPE, 13.48, 1));
    objects.insert(
        format!("{TOMO_DIR}/tomogram_metadata.json"),
        json(&[
            ("voxel_spacing", "13.48"),
            ("size", r#"{"x": 320, "y": 320, "z": 80}"#),
            ("mrc_file", &format!("\"{TOMO_DIR}/TS_026.mrc\"")),
            ("omezarr_dir", &format!("\"{TOMO_DIR}/TS_026.zarr\"")),
        ]),
    );
    add_zarr(&mut objects, &format!("{TOMO_DIR}/TS_026.zarr"), [64, 128, 128], [32, 48, 64], 7);
    let annotations = "10000/TS_026/Reconstructions/VoxelSpacing13.480/Annotations/100";
    objects.insert(
        format!("{annotations}/cytosolic_ribosome-1.0.json"),
        json(&[("annotation_object", r#"{"id": "GO:0022626", "name": "cytosolic ribosome"}"#), ("object_count", "3")]),
    );
    let points: String = (0..3)
        .map(|i| format!("{{\"type\": \"point\", \"location\": {{\"x\": {i}.5, \"y\": 2.0, \"z\": 3.0}}}}\n"))
        .collect();
    objects.insert(format!("{annotations}/cytosolic_ribosome-1.0_point.ndjson"), points.into_bytes());
    for i in 0..FRAMES {
        objects.insert(format!("10000/TS_026/Frames/frame_{i:04}.tif"), noise(100 + i as u64, 1 + i % 97));
    }
    objects.insert("10000/TS_026/Frames/empty.mdoc".into(), Vec::new());
    objects.insert(
        "10001/24apr23a_Position_12/TiltSeries/100/24apr23a_Position_12.mrc".into(),
        mrc_bytes((64, 64, 41), 4.99, 2),
    );
    objects.insert(
        "depositions_metadata/10310/deposition_metadata.json".into(),
        json(&[("deposition_identifier", "10310")]),
    );

    write_bucket(root, &objects);
    Fixture { root: root.to_path_buf(), objects }
}

/// Writes `objects` where [`start_server`] serves them from `root`, with their ETag sidecars.
pub fn write_bucket(root: &Path, objects: &BTreeMap<String, Vec<u8>>) {
    for (key, bytes) in objects {
        put_object(root, key, bytes);
    }
}

/// Writes (or replaces, with a new ETag) object `key` of the bucket s3s-fs serves from `root`.
pub fn put_object(root: &Path, key: &str, bytes: &[u8]) {
    let path = root.join(BUCKET).join(key);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let etag = format!("{:016x}{:016x}", cdpfs::hash::stable_hash(&[bytes]), bytes.len());
    // Replaced in place by rename, as an upload would: a reader never sees half a file.
    let temp = path.with_extension("upload-tmp");
    fs::write(&temp, bytes).unwrap();
    fs::rename(&temp, &path).unwrap();
    fs::write(sidecar(root, key), format!("{{\"e_tag\":\"{etag}\"}}")).unwrap();
}

/// A Python with mrcfile, zarr (v2) and numpy: `$CDPFS_TEST_PYTHON`, else `python3` if it has
/// them. `None` (the caller skips, saying so) when there is none; CI always sets it.
pub fn python() -> Option<String> {
    if let Ok(python) = std::env::var("CDPFS_TEST_PYTHON") {
        return Some(python);
    }
    let probe = Command::new("python3").args(["-c", "import mrcfile, zarr, numpy"]).output();
    if probe.is_ok_and(|o| o.status.success()) {
        return Some("python3".into());
    }
    eprintln!("SKIPPED: python3 with mrcfile and zarr not found (set CDPFS_TEST_PYTHON)");
    None
}

/// Runs `python` with `args` and fails the test unless it exits 0 and prints `marker`.
pub fn run_python(python: &str, args: &[&std::ffi::OsStr], marker: &str) {
    let out = Command::new(python).args(args).output().unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(marker),
        "python check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The whole of the file at `path`.
pub fn read_whole(path: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut fs::File::open(path).unwrap(), &mut bytes).unwrap();
    bytes
}

/// The `cdpfs` binary under test.
pub fn cdpfs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cdpfs"))
}

/// `cdpfs mount MOUNTPOINT --bucket BUCKET --endpoint-url ENDPOINT`, for a test to add options
/// and an environment to ([`Mounted::on`] mounts with neither).
pub fn mount_command(mountpoint: &Path, endpoint: &str) -> Command {
    let mut command = cdpfs();
    command.arg("mount").arg(mountpoint).args(["--bucket", BUCKET, "--endpoint-url", endpoint]);
    command
}

/// Runs `cdpfs` with `args` and returns its output, failing the test if it takes over `limit`.
pub fn run_cdpfs(args: &[&str], limit: Duration) -> Output {
    let mut child =
        cdpfs().args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("cdpfs {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Fails the test early, with a clear reason, when this machine cannot mount FUSE.
pub fn require_fuse() {
    assert!(Path::new("/dev/fuse").exists(), "these tests mount a real FUSE filesystem: /dev/fuse is missing");
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests mount FUSE and must run as root (as CI does)");
}

/// Whether something is mounted exactly at `path`.
pub fn is_mounted(path: &Path) -> bool {
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    fs::read_to_string("/proc/self/mountinfo").unwrap().lines().any(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
}

/// `VmHWM` or `VmRSS` (the `field` of /proc/PID/status) of the process serving `mountpoint`,
/// in bytes.
pub fn process_memory(mountpoint: &Path, field: &str) -> u64 {
    let pid = serving_pid(mountpoint).expect("the mount's process");
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// The pid of the `cdpfs` process serving `mountpoint`, if one runs.
pub fn serving_pid(mountpoint: &Path) -> Option<u32> {
    let wanted = mountpoint.to_str().unwrap().as_bytes();
    fs::read_dir("/proc").unwrap().flatten().find_map(|p| {
        let cmdline = fs::read(p.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let serving = args.iter().any(|a| a.ends_with(b"cdpfs")) && args.contains(&wanted);
        if serving {
            p.file_name().to_str()?.parse().ok()
        } else {
            None
        }
    })
}

/// The number of GETs `server` has served, once none has come for 300 ms.
pub fn quiet(server: &Server) -> usize {
    let mut last = server.served.lock().unwrap().len();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = server.served.lock().unwrap().len();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// A live mount of the shared fixture; unmounted on drop.
pub struct Mounted {
    /// The mount point.
    pub path: PathBuf,
}

impl Mounted {
    /// Mounts the shared fixture (background mode, as a user would) with `extra` options.
    pub fn new(name: &str, extra: &[&str]) -> Mounted {
        Mounted::on(&shared().1, name, extra)
    }

    /// Mounts the bucket `server` serves with `extra` options.
    pub fn on(server: &Server, name: &str, extra: &[&str]) -> Mounted {
        require_fuse();
        let path = scratch_dir(&format!("mnt-{name}"));
        let url = server.addr_url();
        let mut args = vec!["mount", path.to_str().unwrap(), "--bucket", BUCKET];
        if !extra.contains(&"--endpoint-url") {
            args.extend_from_slice(&["--endpoint-url", &url]);
        }
        // A fresh cache of its own unless the test brings one.
        let cache = match extra.contains(&"--cache-dir") || extra.contains(&"--no-disk-cache") {
            true => String::new(),
            false => scratch_dir(&format!("cache-{name}")).to_string_lossy().into_owned(),
        };
        if !cache.is_empty() {
            args.extend_from_slice(&["--cache-dir", &cache]);
        }
        args.extend_from_slice(extra);
        let out = run_cdpfs(&args, Duration::from_secs(60));
        assert!(out.status.success(), "mount failed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(is_mounted(&path), "cdpfs mount returned before the mount was ready");
        Mounted { path }
    }

    /// Mounts the shared fixture with the disk cache in `cache_dir`.
    pub fn with_cache(name: &str, cache_dir: &Path) -> Mounted {
        Mounted::new(name, &["--cache-dir", cache_dir.to_str().unwrap()])
    }

    /// The mounted path of `key`.
    pub fn join(&self, key: &str) -> PathBuf {
        self.path.join(key)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !is_mounted(&self.path) {
            let _ = fs::remove_dir(&self.path);
            return;
        }
        let out = run_cdpfs(&["unmount", self.path.to_str().unwrap()], Duration::from_secs(30));
        if !out.status.success() {
            let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(&self.path).status();
        }
        let started = Instant::now();
        while is_mounted(&self.path) && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = fs::remove_dir(&self.path);
    }
}

/// nginx in front of a test server as a site cache, as HPC sites do for CVMFS (or as a TLS
/// front).
pub struct Nginx {
    child: std::process::Child,
    /// Its URL (`https://localhost:PORT` when it serves TLS).
    pub url: String,
    pub port: u16,
}

impl Nginx {
    /// Starts nginx with a `proxy_cache` in front of `upstream`, or None when nginx is not
    /// installed (CI installs it and sets CDPFS_REQUIRE_NGINX, making that a failure).
    pub fn start(upstream: &str) -> Option<Nginx> {
        Nginx::start_with(upstream, None)
    }

    /// The same, serving https (as `localhost`) with the certificate and key `tls`.
    pub fn start_with(upstream: &str, tls: Option<(&Path, &Path)>) -> Option<Nginx> {
        let binary =
            ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"].into_iter().find(|p| Path::new(p).exists());
        let Some(binary) = binary else {
            assert!(std::env::var_os("CDPFS_REQUIRE_NGINX").is_none(), "nginx is required but not installed");
            eprintln!("SKIPPED: nginx not installed");
            return None;
        };
        let dir = scratch_dir("nginx");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let upstream = upstream.trim_start_matches("http://");
        let d = dir.display();
        let (ssl, certificate) = match tls {
            Some((cert, key)) => {
                (" ssl", format!("ssl_certificate {};\n        ssl_certificate_key {};", cert.display(), key.display()))
            }
            None => ("", String::new()),
        };
        let config = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    proxy_cache_path {d}/cache levels=1:2 keys_zone=s3:10m max_size=1g inactive=1h use_temp_path=off;
    map $args $is_listing {{ ~list-type 1; default 0; }}
    server {{
        listen 127.0.0.1:{port}{ssl};
        {certificate}
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Range $http_range;
            proxy_cache s3;
            proxy_cache_key "$request_method $uri$is_args$args $http_range $http_if_match";
            proxy_cache_valid 200 206 1h;
            proxy_cache_lock on;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            proxy_no_cache $is_listing;
            proxy_cache_bypass $is_listing;
        }}
    }}
}}
"#
        );
        fs::write(dir.join("nginx.conf"), config).unwrap();
        let child = Command::new(binary)
            .args(["-c", dir.join("nginx.conf").to_str().unwrap(), "-p", dir.to_str().unwrap()])
            // One process (master_process off) with no inherited output: killing it leaves nothing.
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "nginx did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let url = match tls {
            Some(_) => format!("https://localhost:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        };
        Some(Nginx { child, url, port })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test CA and a certificate for `host` it signed (made with openssl): the CA's file (for
/// `SSL_CERT_FILE`), the certificate's and its key's.
pub fn test_certificate(host: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = scratch_dir(&format!("tls-{host}"));
    let [ca, ca_key, cert, key] = ["ca.pem", "ca.key", "cert.pem", "key.pem"].map(|name| dir.join(name));
    let openssl = |args: &[&str]| {
        let made = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"])
            .args(args)
            .output()
            .expect("openssl is needed to make the test's certificates");
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    };
    let path = |p: &PathBuf| p.to_str().unwrap().to_owned();
    openssl(&["-subj", "/CN=cdpfs test CA", "-keyout", &path(&ca_key), "-out", &path(&ca)]);
    openssl(&[
        "-subj",
        &format!("/CN={host}"),
        "-addext",
        &format!("subjectAltName=DNS:{host}"),
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-CA",
        &path(&ca),
        "-CAkey",
        &path(&ca_key),
        "-keyout",
        &path(&key),
        "-out",
        &path(&cert),
    ]);
    (ca, cert, key)
}
