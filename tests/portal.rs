//! The portal's own map in the mount, end to end: portal ids as symlinks, `user.cryoet.*`
//! attributes from the bucket's JSON, facet folders and `cdpfs info`, against a real S3 server
//! and a GraphQL server on loopback that loads the portal's real schema and checks every query
//! against it (tests/fixtures/portal_api.py; its rows match the bucket built here).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{Mounted, Server, TOMO_DIR};
use serde_json::{json, Value};

const S3: &str = "s3://cryoet-data-portal-public/";
const RUN: &str = "10000/TS_026";
const VS: &str = "10000/TS_026/Reconstructions/VoxelSpacing13.480";
const POS: &str = "10001/24apr23a_Position_12";

/// The bucket: the shared fixture with the portal's sidecars filled in, a third dataset, a tilt
/// series, an alignment, three annotations, and a real key named like an id.
fn bucket() -> &'static (common::Fixture, Server) {
    static BUCKET: OnceLock<(common::Fixture, Server)> = OnceLock::new();
    BUCKET.get_or_init(|| {
        let root = common::scratch_dir("portal-fixture");
        let mut fixture = common::build_fixture(&root);
        let sidecar = |value: Value| serde_json::to_vec_pretty(&value).unwrap();
        let dataset = |id: u32, title: &str, organism: &str, taxid: u32, sample_type: &str| {
            sidecar(json!({
                "dataset_identifier": id, "dataset_title": title,
                "organism": {"name": organism, "taxonomy_id": taxid}, "sample_type": sample_type,
                "cell_type": {"id": "CL:0000334", "name": "vegetative cell"}, "tissue": null,
                "deposition_id": 10310, "last_updated_at": 1716000000
            }))
        };
        let objects: Vec<(String, Vec<u8>)> = vec![
            ("10000/dataset_metadata.json".into(), dataset(10000, "Whole-cell tomograms", "Schizosaccharomyces pombe", 4896, "organism")),
            ("10001/dataset_metadata.json".into(), dataset(10001, "Ribosomes in situ", "Saccharomyces cerevisiae", 4932, "cell")),
            ("10002/dataset_metadata.json".into(), dataset(10002, "More fission yeast", "Schizosaccharomyces pombe", 4896, "organism")),
            ("10002/TS_1/run_metadata.json".into(), sidecar(json!({"run_name": "TS_1", "deposition_id": 10310}))),
            (format!("{POS}/run_metadata.json"), sidecar(json!({"run_name": "24apr23a_Position_12"}))),
            (
                format!("{TOMO_DIR}/tomogram_metadata.json"),
                sidecar(json!({
                    "voxel_spacing": 13.48, "size": {"x": 320, "y": 320, "z": 80}, "processing": "raw",
                    "reconstruction_method": "WBP", "reconstruction_software": "IMOD", "ctf_corrected": false,
                    "mrc_file": format!("{TOMO_DIR}/TS_026.mrc"), "omezarr_dir": format!("{TOMO_DIR}/TS_026.zarr")
                })),
            ),
            (
                format!("{VS}/Annotations/100/cytosolic_ribosome-1.0.json"),
                sidecar(json!({
                    "annotation_object": {"id": "GO:0022626", "name": "cytosolic ribosome"}, "object_count": 3,
                    "method_type": "manual", "ground_truth_status": true,
                    "confidence": {"precision": 0.9, "recall": 0.8},
                    "files": [{"format": "ndjson", "shape": "Point",
                               "path": format!("{VS}/Annotations/100/cytosolic_ribosome-1.0_point.ndjson")}]
                })),
            ),
            (
                format!("{VS}/Annotations/101/membrane-1.0.json"),
                sidecar(json!({
                    "annotation_object": {"id": "GO:0016020", "name": "membrane"}, "method_type": "hybrid",
                    "ground_truth_status": false,
                    "files": [{"format": "mrc", "shape": "SegmentationMask",
                               "path": format!("{VS}/Annotations/101/membrane-1.0_segmentationmask.mrc")}]
                })),
            ),
            (format!("{VS}/Annotations/101/membrane-1.0_segmentationmask.mrc"), common::mrc_bytes((32, 32, 8), 13.48, 5)),
            (
                format!("{POS}/Reconstructions/VoxelSpacing4.990/Annotations/100/cytosolic_ribosome-1.0.json"),
                sidecar(json!({"annotation_object": {"id": "GO:0022626", "name": "cytosolic ribosome"}, "method_type": "automated"})),
            ),
            (
                format!("{POS}/TiltSeries/100/tiltseries_metadata.json"),
                sidecar(json!({
                    "microscope": {"manufacturer": "TFS", "model": "Krios"}, "camera": {"manufacturer": "Gatan", "model": "K3"},
                    "tilt_range": {"min": -60.0, "max": 60.0}, "tilt_step": 3.0, "pixel_spacing": 4.99,
                    "acceleration_voltage": 300000
                })),
            ),
            (format!("{POS}/Alignments/100/alignment_metadata.json"), sidecar(json!({"alignment_type": "GLOBAL"}))),
            (format!("{POS}/Alignments/100/24apr23a_Position_12.xf"), b"1 0 0 1 0 0\n".to_vec()),
            ("RN-242".into(), b"a real key named like an id\n".to_vec()),
        ];
        for (key, bytes) in objects {
            common::put_object(&root, &key, &bytes);
            fixture.objects.insert(key, bytes);
        }
        let server = common::start_server(&root, common::Faults::default());
        (fixture, server)
    })
}

/// The API's rows for the bucket above (real ids where the portal has them for these objects).
fn rows() -> Value {
    let url = |key: &str| format!("{S3}{key}");
    json!({
        "datasets": [
            {"id": 10000, "organismName": "Schizosaccharomyces pombe", "sampleType": "organism", "s3Prefix": url("10000/")},
            {"id": 10001, "organismName": "Saccharomyces cerevisiae", "sampleType": "cell", "s3Prefix": url("10001/")},
            {"id": 10002, "organismName": "Schizosaccharomyces pombe", "sampleType": "organism", "s3Prefix": url("10002/")},
        ],
        "runs": [
            {"id": 241, "datasetId": 10000, "name": "TS_026", "s3Prefix": url("10000/TS_026/")},
            {"id": 242, "datasetId": 10000, "name": "TS with space", "s3Prefix": url("10000/TS with space/")},
            {"id": 243, "datasetId": 10000, "name": "Ünïcode_run_é", "s3Prefix": url("10000/Ünïcode_run_é/")},
            {"id": 17687, "datasetId": 10001, "name": "24apr23a_Position_12", "s3Prefix": url(&format!("{POS}/"))},
            {"id": 300, "datasetId": 10002, "name": "TS_1", "s3Prefix": url("10002/TS_1/")},
        ],
        "tomograms": [{"id": 621, "runId": 241, "s3MrcFile": url(&format!("{TOMO_DIR}/TS_026.mrc")),
                       "s3OmezarrDir": url(&format!("{TOMO_DIR}/TS_026.zarr"))}],
        "tiltseries": [{"id": 17489, "runId": 17687, "s3MrcFile": url(&format!("{POS}/TiltSeries/100/24apr23a_Position_12.mrc")),
                        "s3OmezarrDir": null}],
        "alignments": [{"id": 18924, "runId": 17687, "s3AlignmentMetadata": url(&format!("{POS}/Alignments/100/alignment_metadata.json"))}],
        "annotations": [
            {"id": 1123, "runId": 241, "objectName": "cytosolic ribosome",
             "s3MetadataPath": url(&format!("{VS}/Annotations/100/cytosolic_ribosome-1.0.json"))},
            {"id": 1129, "runId": 241, "objectName": "membrane",
             "s3MetadataPath": url(&format!("{VS}/Annotations/101/membrane-1.0.json"))},
            {"id": 69545, "runId": 17687, "objectName": "cytosolic ribosome",
             "s3MetadataPath": url(&format!("{POS}/Reconstructions/VoxelSpacing4.990/Annotations/100/cytosolic_ribosome-1.0.json"))},
        ],
    })
}

/// The GraphQL test server (a Python process we started; killed on drop).
struct Api {
    child: Child,
    port: u16,
}

impl Api {
    fn start() -> Option<Api> {
        let python = common::python()?;
        let probe = Command::new(&python).args(["-c", "import graphql"]).output().unwrap();
        assert!(probe.status.success(), "{python} lacks graphql-core (pip install graphql-core; CI's .ci/run does)");
        let dir = common::scratch_dir("portal-api");
        let rows_path = dir.join("rows.json");
        fs::write(&rows_path, serde_json::to_vec(&rows()).unwrap()).unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut child = Command::new(&python)
            .arg(fixtures.join("portal_api.py"))
            .arg(fixtures.join("portal-schema.graphql"))
            .arg(&rows_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| panic!("the API server did not start: {line:?}"));
        Some(Api { child, port })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/graphql", self.port)
    }

    /// From now on the server accepts GraphQL requests and never answers them.
    fn hang(&self) {
        self.get("/hang");
    }

    /// From now on the server answers every GraphQL request with HTTP `status`.
    fn fail_with(&self, status: u16) {
        self.get(&format!("/fail/{status}"));
    }

    fn counts(&self) -> Value {
        self.get("/counts")
    }

    fn get(&self, path: &str) -> Value {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    }

    /// GraphQL requests served so far; every one must have passed the schema.
    fn requests(&self) -> u64 {
        let counts = self.counts();
        assert_eq!(counts["errors"], 0, "the API rejected queries: {}", counts["error_messages"]);
        counts["requests"].as_u64().unwrap()
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mount(name: &str, api_url: &str, extra: &[&str]) -> Mounted {
    let mut args = vec!["--api-url", api_url, "--metadata-ttl", "1s"];
    args.extend_from_slice(extra);
    Mounted::on(&bucket().1, name, &args)
}

fn errno_of(result: std::io::Result<impl Sized>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

/// The `user.cryoet.*` attributes of `path` (listed, then each read), without the prefix.
fn cryoet_attributes(path: &Path) -> BTreeMap<String, String> {
    cryoet_attributes_listed(path)
        .into_iter()
        .map(|short| {
            let value = cdpfs::stage::xattr(path, &format!("user.cryoet.{short}")).unwrap();
            (short, value)
        })
        .collect()
}

fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Each API id, the link target it resolves to, and a file read through it.
const IDS: [(&str, &str, &str); 6] = [
    ("RN-241", RUN, "run_metadata.json"),
    ("RN-243", "10000/Ünïcode_run_é", "run_metadata.json"),
    ("TM-621", "10000/TS_026/Reconstructions/VoxelSpacing13.480/Tomograms/100/TS_026.mrc", ""),
    ("TS-17489", "10001/24apr23a_Position_12/TiltSeries/100/24apr23a_Position_12.mrc", ""),
    ("AN-1129", "10000/TS_026/Reconstructions/VoxelSpacing13.480/Annotations/101", "membrane-1.0.json"),
    ("AL-18924", "10001/24apr23a_Position_12/Alignments/100", "24apr23a_Position_12.xf"),
];

/// Checks every id of [`IDS`] (and the two fixed kinds) resolves to its place and reads the
/// bucket's bytes through the link.
fn check_ids(mount: &Mounted) {
    let fixture = &bucket().0;
    let fixed = [
        ("DS-10000", "10000", "dataset_metadata.json"),
        ("CZCDP-10310", "depositions_metadata/10310", "deposition_metadata.json"),
    ];
    for (name, target, file) in IDS.iter().chain(&fixed) {
        let link = mount.join(name);
        assert_eq!(fs::read_link(&link).unwrap(), PathBuf::from(target), "{name}");
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        let (through, key) = match *file {
            "" => (link.clone(), target.to_string()),
            file => (link.join(file), format!("{target}/{file}")),
        };
        assert!(common::read_whole(&through) == fixture.objects[&key], "{name}: bytes of {key}");
    }
}

#[test]
fn ids_resolve_to_their_places_once_per_id_and_are_shared_through_the_cache_dir() {
    let Some(api) = Api::start() else { return };
    let cache = common::scratch_dir("portal-cache-ids");
    let mount = mount("ids", &api.url(), &["--cache-dir", cache.to_str().unwrap()]);
    check_ids(&mount);
    assert_eq!(api.requests(), IDS.len() as u64, "one request per API id, none for DS- and CZCDP-");

    // Ids are not listed; the facet folders are.
    let root: BTreeSet<String> =
        fs::read_dir(&mount.path).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    for name in ["by-organism", "by-sample-type", "by-object", "10000"] {
        assert!(root.contains(name), "{name} not in {root:?}");
    }
    assert!(!root.iter().any(|n| n.starts_with("TM-") || n.starts_with("DS-")), "{root:?}");

    // A real key of the same name wins, without asking the API.
    let before = api.requests();
    let real = mount.join("RN-242");
    assert!(fs::symlink_metadata(&real).unwrap().is_file());
    assert_eq!(fs::read(&real).unwrap(), bucket().0.objects["RN-242"]);
    // Not ids, or ids of nothing: ENOENT; only a well-formed API id asks (once).
    for name in ["RN-0241", "XX-1", "RN-", "DS-99999", "CZCDP-1", "rn-241"] {
        assert_eq!(errno_of(fs::symlink_metadata(mount.join(name))), Some(libc::ENOENT), "{name}");
    }
    assert_eq!(api.requests(), before, "names that are no API ids never ask");
    assert_eq!(errno_of(fs::symlink_metadata(mount.join("RN-999999"))), Some(libc::ENOENT));
    assert_eq!(api.requests(), before + 1);

    // Past the kernel's entry TTL (1 s), every lookup reaches cdpfs again: answered from memory.
    std::thread::sleep(Duration::from_millis(1500));
    check_ids(&mount);
    assert_eq!(errno_of(fs::symlink_metadata(mount.join("RN-999999"))), Some(libc::ENOENT));
    assert_eq!(api.requests(), before + 1, "no id asked again within the TTL");

    // Another mount sharing the cache directory asks nothing.
    let second =
        Mounted::on(&bucket().1, "ids-second", &["--api-url", &api.url(), "--cache-dir", cache.to_str().unwrap()]);
    check_ids(&second);
    assert_eq!(api.requests(), before + 1, "a second mount on the same cache dir asked the API");
    eprintln!("{} ids resolved by two mounts with {} API requests", IDS.len() + 2, api.requests());
}

/// An HTTP proxy on loopback that takes every connection, whatever host it names, to one
/// server, and keeps the request head of each: a forwarded request (absolute form) to
/// `forward_to` (a 502 when that is down), a CONNECT tunnel to `tunnel_to`.
struct Proxy {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    fn start(forward_to: u16, tunnel_to: u16) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let kept = heads.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let kept = kept.clone();
                std::thread::spawn(move || Self::relay(client, forward_to, tunnel_to, &kept));
            }
        });
        Proxy { port, heads }
    }

    fn relay(mut client: std::net::TcpStream, forward_to: u16, tunnel_to: u16, heads: &Mutex<Vec<String>>) {
        let mut head = Vec::new();
        let mut byte = [0u8];
        while !head.ends_with(b"\r\n\r\n") && client.read(&mut byte).is_ok_and(|n| n == 1) {
            head.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        heads.lock().unwrap().push(text.clone());
        let tunnel = text.starts_with("CONNECT ");
        let Ok(mut server) = std::net::TcpStream::connect(("127.0.0.1", if tunnel { tunnel_to } else { forward_to }))
        else {
            let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
            return;
        };
        let sent = match tunnel {
            true => client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            false => server.write_all(&head),
        };
        if sent.is_err() {
            return;
        }
        let (mut from_server, mut to_client) = (server.try_clone().unwrap(), client.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from_server, &mut to_client);
            let _ = to_client.shutdown(std::net::Shutdown::Write);
        });
        let _ = std::io::copy(&mut client, &mut server);
        let _ = server.shutdown(std::net::Shutdown::Write);
    }

    /// Its URL, with `credentials` (`user:password@`) if given.
    fn url(&self, credentials: &str) -> String {
        format!("http://{credentials}127.0.0.1:{}", self.port)
    }

    /// The request heads it was sent from the `from`th on.
    fn heads(&self, from: usize) -> Vec<String> {
        self.heads.lock().unwrap()[from..].to_vec()
    }

    fn count(&self) -> usize {
        self.heads.lock().unwrap().len()
    }
}

/// The API's host name in the proxy tests: it resolves nowhere, so only a proxy reaches it.
const PROXIED_HOST: &str = "portal-api.invalid";

/// Mounts the bucket (reached directly) with `api_url`, behind the proxy at `proxy_url` (in the
/// environment, with `no_proxy`), trusting the CA in `trust`.
fn mount_behind(proxy_url: &str, no_proxy: &str, name: &str, api_url: &str, trust: Option<&Path>) -> Mounted {
    let mountpoint = common::scratch_dir(&format!("mnt-{name}"));
    let cache = common::scratch_dir(&format!("cache-{name}"));
    let mut command = common::mount_command(&mountpoint, &bucket().1.addr_url());
    command
        .args(["--api-url", api_url, "--cache-dir", cache.to_str().unwrap(), "--metadata-ttl", "1s"])
        .env("HTTP_PROXY", proxy_url)
        .env("HTTPS_PROXY", proxy_url)
        .env("NO_PROXY", no_proxy)
        .env_remove("no_proxy");
    if let Some(trust) = trust {
        command.env("SSL_CERT_FILE", trust);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "mount failed: {}", String::from_utf8_lossy(&out.stderr));
    Mounted { path: mountpoint }
}

/// A node behind an HTTP proxy (`HTTP_PROXY`/`HTTPS_PROXY`), where the API's host name does not
/// even resolve: ids resolve through the proxy, by forwarded requests to an http API (with the
/// proxy's credentials) and by a CONNECT tunnel to an https one (as the real one is; TLS runs
/// inside the tunnel, the certificate checked for the API's name). A host in `NO_PROXY` is not
/// sent to the proxy, and an API the proxy cannot reach (502) is left alone like a dead one.
#[test]
fn behind_an_http_proxy_the_api_is_reached_through_it() {
    let Some(api) = Api::start() else { return };
    let api_url = format!("http://{PROXIED_HOST}:{}/graphql", api.port);
    let proxy = Proxy::start(api.port, 0);
    let (requests, from) = (api.requests(), proxy.count());
    let mount = mount_behind(&proxy.url("reader:s3cret@"), "127.0.0.1", "api-behind-proxy", &api_url, None);
    check_ids(&mount);
    assert_eq!(api.requests() - requests, IDS.len() as u64, "one request per API id");
    let heads = proxy.heads(from);
    assert!(!heads.is_empty(), "no request went through the proxy");
    for head in &heads {
        assert!(head.starts_with(&format!("POST {api_url} HTTP/1.1\r\n")), "not a forwarded API request: {head:?}");
        let credentials = "proxy-authorization: Basic cmVhZGVyOnMzY3JldA=="; // reader:s3cret
        assert!(head.lines().any(|line| line.eq_ignore_ascii_case(credentials)), "no credentials: {head:?}");
    }
    drop(mount);

    // The API's host in NO_PROXY: not sent to the proxy (and, resolving nowhere, not found).
    let from = proxy.count();
    let mount = mount_behind(&proxy.url(""), &format!("127.0.0.1,{PROXIED_HOST}"), "api-no-proxy", &api_url, None);
    assert!(fs::symlink_metadata(mount.join("RN-241")).is_err());
    assert_eq!(proxy.count(), from, "a NO_PROXY host was asked through the proxy");
    drop(mount);

    // The proxy cannot reach the API (502): retried, then left alone for a while.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = Proxy::start(dead_port, 0);
    let dead_url = format!("http://{PROXIED_HOST}:{dead_port}/graphql");
    let mount = mount_behind(&dead.url(""), "127.0.0.1", "api-dead-behind-proxy", &dead_url, None);
    assert!(fs::symlink_metadata(mount.join("RN-241")).is_err());
    let asked = dead.count();
    assert!(asked >= 1);
    assert!(fs::symlink_metadata(mount.join("RN-243")).is_err());
    assert_eq!(dead.count(), asked, "the API was asked again right after the proxy said it is unreachable");
    drop(mount);

    // An https API, through a CONNECT tunnel to nginx with TLS in front of the API server.
    let (ca, cert, key) = common::test_certificate(PROXIED_HOST);
    let Some(tls) = common::Nginx::start_with(&format!("127.0.0.1:{}", api.port), Some((&cert, &key))) else {
        return;
    };
    let proxy = Proxy::start(api.port, tls.port);
    let https_url = format!("https://{PROXIED_HOST}:{}/graphql", tls.port);
    let requests = api.requests();
    let mount = mount_behind(&proxy.url(""), "127.0.0.1", "https-api-behind-proxy", &https_url, Some(&ca));
    check_ids(&mount);
    assert_eq!(api.requests() - requests, IDS.len() as u64, "one request per API id");
    let heads = proxy.heads(0);
    assert!(!heads.is_empty(), "no request went through the proxy");
    for head in &heads {
        let tunnel = format!("CONNECT {PROXIED_HOST}:{} HTTP/1.1\r\n", tls.port);
        assert!(head.starts_with(&tunnel), "not a tunnel to the API: {head:?}");
    }
}

/// An API that keeps answering 503 (overloaded) or 429 (rate limiting) is left alone like a
/// dead one once a call's retries are spent: lookups then fail at once instead of each sending
/// its own retries (4 requests, ~1.5 s, a warning) to an API that asked to be left alone.
#[test]
fn an_api_that_keeps_failing_or_throttling_is_left_alone() {
    for status in [503, 429] {
        let Some(api) = Api::start() else { return };
        let mount = mount(&format!("api-{status}"), &api.url(), &[]);
        api.fail_with(status);
        let failed = || api.counts()["failed"].as_u64().unwrap();
        assert_eq!(errno_of(fs::symlink_metadata(mount.join("RN-241"))), Some(libc::EIO), "{status}");
        let one_call = failed();
        assert!((1..=4).contains(&one_call), "{status}: {one_call} requests for one lookup");
        let started = Instant::now();
        for id in ["TM-621", "AN-1129", "AL-5", "TS-7"] {
            assert_eq!(errno_of(fs::symlink_metadata(mount.join(id))), Some(libc::EIO), "{status} {id}");
        }
        assert!(started.elapsed() < Duration::from_millis(500), "{status}: {:?}", started.elapsed());
        assert_eq!(failed(), one_call, "{status}: the API was asked again");
    }
}

#[test]
fn the_api_down_or_hanging_leaves_the_tree_alone_and_cached_ids_keep_serving() {
    let Some(api) = Api::start() else { return };
    let url = api.url();
    let cache = common::scratch_dir("portal-cache-down");
    let cache_arg = ["--cache-dir", cache.to_str().unwrap()];
    {
        let first = mount("down-first", &url, &cache_arg);
        assert_eq!(fs::read_link(first.join("RN-241")).unwrap(), PathBuf::from(RUN));
    }
    let fixture = &bucket().0;
    let tomogram = format!("{TOMO_DIR}/TS_026.mrc");
    // Remounted on the same cache dir, while the API accepts and never answers, then while
    // nothing listens on its port.
    let mut api = Some(api);
    for name in ["down-hanging", "down-refused"] {
        match name {
            "down-hanging" => api.as_ref().unwrap().hang(),
            _ => drop(api.take()),
        }
        let mount = mount(name, &url, &[&cache_arg[..], &["--api-timeout", "2s"]].concat());
        // The tree does not depend on the API.
        assert!(common::read_whole(&mount.join(&tomogram)) == fixture.objects[&tomogram], "{name}");
        assert_eq!(fs::read_dir(mount.join(RUN)).unwrap().count(), 3, "Frames, Reconstructions, run_metadata.json");
        // A cached id keeps serving; an id never asked fails with EIO within the timeout.
        assert_eq!(fs::read_link(mount.join("RN-241")).unwrap(), PathBuf::from(RUN), "{name}");
        assert!(
            common::read_whole(&mount.join("RN-241/run_metadata.json"))
                == fixture.objects[&format!("{RUN}/run_metadata.json")]
        );
        let started = Instant::now();
        assert_eq!(errno_of(fs::symlink_metadata(mount.join("TM-621"))), Some(libc::EIO), "{name}");
        let first = started.elapsed();
        assert!(first < Duration::from_secs(3), "{name}: the first failed lookup took {first:?} (timeout 2 s)");
        // The API was found down: further lookups fail at once.
        let started = Instant::now();
        assert_eq!(errno_of(fs::read_dir(mount.join("by-object"))), Some(libc::EIO), "{name}");
        assert_eq!(errno_of(fs::symlink_metadata(mount.join("AN-1129"))), Some(libc::EIO), "{name}");
        let then = started.elapsed();
        assert!(then < Duration::from_secs(1), "{name}: lookups after the API was found down took {then:?}");
        let took = first + then;
        // DS- and CZCDP- need no API.
        assert_eq!(fs::read_link(mount.join("DS-10001")).unwrap(), PathBuf::from("10001"));
        eprintln!("{name}: tree served, cached id served, uncached id and facet EIO in {took:?}");
    }
    // Without the API: no API ids, no facet folders; datasets and depositions still resolve.
    let off = Mounted::on(&bucket().1, "no-api", &["--api-url", &url, "--no-portal-api"]);
    assert_eq!(errno_of(fs::symlink_metadata(off.join("RN-241"))), Some(libc::ENOENT));
    assert_eq!(errno_of(fs::symlink_metadata(off.join("by-object"))), Some(libc::ENOENT));
    assert_eq!(fs::read_link(off.join("CZCDP-10310")).unwrap(), PathBuf::from("depositions_metadata/10310"));
}

#[test]
fn metadata_attributes_equal_the_bucket_json_on_every_level() {
    let Some(api) = Api::start() else { return };
    // A server of its own and no listing ahead: the probes below count S3 requests.
    let server = common::start_server(&bucket().0.root, common::Faults::default());
    let mount = Mounted::on(&server, "xattrs", &["--api-url", &api.url(), "--list-ahead", "0"]);
    let dataset = attrs(&[
        ("kind", "dataset"),
        ("id", "DS-10000"),
        ("title", "Whole-cell tomograms"),
        ("organism", "Schizosaccharomyces pombe"),
        ("organism_taxid", "4896"),
        ("sample_type", "organism"),
        ("cell_type", "vegetative cell"),
        ("deposition_id", "10310"),
    ]);
    let tomogram = attrs(&[
        ("kind", "tomogram"),
        ("id", "TM-621"),
        ("voxel_spacing", "13.48"),
        ("size", "320x320x80"),
        ("processing", "raw"),
        ("reconstruction_method", "WBP"),
        ("reconstruction_software", "IMOD"),
        ("ctf_corrected", "false"),
    ]);
    let expected: Vec<(String, BTreeMap<String, String>)> = vec![
        ("10000".into(), dataset.clone()),
        ("DS-10000".into(), dataset),
        (RUN.into(), attrs(&[("kind", "run"), ("id", "RN-241"), ("run_name", "TS_026")])),
        (TOMO_DIR.into(), tomogram.clone()),
        (format!("{TOMO_DIR}/TS_026.mrc"), tomogram),
        (
            format!("{VS}/Annotations/100"),
            attrs(&[
                ("kind", "annotation"),
                ("id", "AN-1123"),
                ("object_name", "cytosolic ribosome"),
                ("object_id", "GO:0022626"),
                ("shape_type", "Point"),
                ("method_type", "manual"),
                ("ground_truth", "true"),
                ("precision", "0.9"),
                ("recall", "0.8"),
                ("object_count", "3"),
            ]),
        ),
        (
            format!("{POS}/TiltSeries/100"),
            attrs(&[
                ("kind", "tiltseries"),
                ("id", "TS-17489"),
                ("microscope", "TFS Krios"),
                ("camera", "Gatan K3"),
                ("tilt_range", "-60.0..60.0"),
                ("tilt_step", "3.0"),
                ("pixel_spacing", "4.99"),
                ("acceleration_voltage", "300000"),
            ]),
        ),
        (
            format!("{POS}/Alignments/100"),
            attrs(&[("kind", "alignment"), ("id", "AL-18924"), ("alignment_type", "GLOBAL")]),
        ),
        ("depositions_metadata/10310".into(), attrs(&[("kind", "deposition"), ("id", "CZCDP-10310")])),
        // No sidecar for these levels: nothing listed.
        ("10000/TS_026/Frames".into(), BTreeMap::new()),
        ("10000/TS_026/Frames/frame_0001.tif".into(), BTreeMap::new()),
        (VS.to_string(), BTreeMap::new()),
    ];
    for (path, want) in &expected {
        assert_eq!(&cryoet_attributes(&mount.join(path)), want, "{path}");
    }
    // Each object's id is one query (a tomogram's folder and its file share it).
    assert_eq!(api.requests(), 5, "{}", api.counts()["operations"]);
    // Files keep their own attributes; an absent name is ENODATA.
    let file = mount.join(&format!("{TOMO_DIR}/TS_026.mrc"));
    assert_eq!(cdpfs::stage::xattr(&file, "user.cdpfs.key").unwrap(), format!("{TOMO_DIR}/TS_026.mrc"));
    assert_eq!(errno_of(cdpfs::stage::xattr(&file, "user.cryoet.organism")), Some(libc::ENODATA));
    assert_eq!(
        errno_of(cdpfs::stage::xattr(&mount.join("10000/TS_026/Frames"), "user.cryoet.kind")),
        Some(libc::ENODATA)
    );
    // Probes where the key layout has no metadata cost nothing: no GET, no listing.
    let frames = mount.join("10000/TS_026/Frames");
    let names: Vec<PathBuf> = fs::read_dir(&frames).unwrap().take(200).map(|e| e.unwrap().path()).collect();
    let (gets, lists) = (server.gets.load(Ordering::SeqCst), server.lists.load(Ordering::SeqCst));
    for path in &names {
        assert_eq!(errno_of(cdpfs::stage::xattr(path, "user.cryoet.kind")), Some(libc::ENODATA));
        assert!(cryoet_attributes(path).is_empty());
    }
    let after = (server.gets.load(Ordering::SeqCst), server.lists.load(Ordering::SeqCst));
    assert_eq!(after, (gets, lists), "{} probes of files without metadata asked S3", names.len() * 2);
}

/// Folders and files of portal objects with database ids, and the id the API gives each.
fn database_ids() -> Vec<(String, &'static str)> {
    let tilt_series = format!("{POS}/TiltSeries/100");
    vec![
        (RUN.into(), "RN-241"),
        (TOMO_DIR.into(), "TM-621"),
        (format!("{TOMO_DIR}/TS_026.mrc"), "TM-621"),
        (format!("{tilt_series}/24apr23a_Position_12.mrc"), "TS-17489"),
        (tilt_series, "TS-17489"),
        (format!("{VS}/Annotations/101"), "AN-1129"),
        (format!("{POS}/Alignments/100"), "AL-18924"),
    ]
}

/// Queries [`database_ids`] needs: one per object.
const DATABASE_OBJECTS: u64 = 5;

/// `getfattr -d PATH` (its exit status, stdout and stderr); `None` without getfattr.
fn getfattr_dump(path: &Path) -> Option<(bool, String, String)> {
    let out = Command::new("getfattr").arg("-d").arg(path).output().ok()?;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    Some((out.status.success(), text(&out.stdout), text(&out.stderr)))
}

#[test]
fn the_id_of_every_portal_object_is_one_query_on_a_fresh_mount_and_shared_through_the_cache_dir() {
    let Some(api) = Api::start() else { return };
    let cache = common::scratch_dir("portal-cache-reverse");
    let cache_arg = ["--cache-dir", cache.to_str().unwrap()];
    let check = |mount: &Mounted| {
        for (path, id) in database_ids() {
            assert_eq!(cdpfs::stage::xattr(&mount.join(&path), "user.cryoet.id").unwrap(), id, "{path}");
        }
    };
    let first = mount("reverse", &api.url(), &cache_arg);
    // Listed by the folder's place in the key layout: listing (and stat, and probes of other
    // names) asks nothing.
    for (path, _) in database_ids() {
        let path = first.join(&path);
        let names = cryoet_attributes_listed(&path);
        assert!(names.contains("id"), "{}: {names:?}", path.display());
        fs::metadata(&path).unwrap();
        assert_eq!(errno_of(cdpfs::stage::xattr(&path, "user.cryoet.no_such")), Some(libc::ENODATA));
    }
    assert_eq!(api.requests(), 0, "listing or probing asked the API");
    check(&first);
    let operations = api.counts()["operations"].clone();
    assert_eq!(api.requests(), DATABASE_OBJECTS, "one query per object: {operations}");
    if let Some((ok, out, err)) = getfattr_dump(&first.join(TOMO_DIR)) {
        assert!(
            ok && out.contains("user.cryoet.id=\"TM-621\"") && out.contains("user.cryoet.processing=\"raw\""),
            "{out}{err}"
        );
    }
    // Past the kernel's TTLs: from memory; then a second mount on the cache dir: from there.
    std::thread::sleep(Duration::from_millis(1500));
    check(&first);
    let second = mount("reverse-second", &api.url(), &cache_arg);
    check(&second);
    assert_eq!(api.requests(), DATABASE_OBJECTS, "asked again on repeat or from a second mount");

    // An id resolved forward answers the reverse question too.
    let forward = mount("reverse-forward", &api.url(), &[]);
    for id in ["RN-17687", "TS-17489", "AL-18924"] {
        fs::read_link(forward.join(id)).unwrap();
    }
    let before = api.requests();
    for (path, id) in [
        (POS.to_string(), "RN-17687"),
        (format!("{POS}/TiltSeries/100"), "TS-17489"),
        (format!("{POS}/TiltSeries/100/24apr23a_Position_12.mrc"), "TS-17489"),
        (format!("{POS}/Alignments/100"), "AL-18924"),
    ] {
        assert_eq!(cdpfs::stage::xattr(&forward.join(&path), "user.cryoet.id").unwrap(), id, "{path}");
    }
    assert_eq!(api.requests(), before, "the reverse of a resolved id asked the API");
    eprintln!("{} paths of {DATABASE_OBJECTS} objects: {before} API requests in all", database_ids().len());

    // The API hangs: the id fails fast with EIO, everything else is served.
    api.hang();
    let down = mount("reverse-down", &api.url(), &["--api-timeout", "2s"]);
    let tomogram = down.join(TOMO_DIR);
    let started = Instant::now();
    assert_eq!(errno_of(cdpfs::stage::xattr(&tomogram, "user.cryoet.id")), Some(libc::EIO));
    let first_failure = started.elapsed();
    assert!(first_failure < Duration::from_secs(3), "the first failed id took {first_failure:?} (timeout 2 s)");
    let started = Instant::now();
    assert_eq!(cdpfs::stage::xattr(&tomogram, "user.cryoet.processing").unwrap(), "raw");
    assert!(cryoet_attributes_listed(&tomogram).contains("id"), "still listed");
    if let Some((_, out, err)) = getfattr_dump(&tomogram) {
        assert!(out.contains("user.cryoet.processing=\"raw\"") && !out.contains("user.cryoet.id="), "{out}{err}");
        eprintln!("getfattr -d with the API down:\n{out}{err}");
    }
    // `cdpfs info` shows what it can.
    let out = common::run_cdpfs(&["info", "--json", tomogram.to_str().unwrap()], Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&report["metadata"]["processing"], &report["metadata"]["id"]), (&json!("raw"), &Value::Null));
    let alignment = down.join(&format!("{POS}/Alignments/100"));
    assert_eq!(errno_of(cdpfs::stage::xattr(&alignment, "user.cryoet.id")), Some(libc::EIO));
    let then = started.elapsed();
    assert!(then < Duration::from_secs(1), "id lookups after the API was found down took {then:?}");
}

#[test]
fn ids_of_many_folders_read_together_go_to_the_api_in_one_batch_per_kind() {
    let Some(api) = Api::start() else { return };
    let mount = mount("reverse-batch", &api.url(), &[]);
    let wanted = [
        (RUN.to_string(), "RN-241"),
        (POS.to_string(), "RN-17687"),
        ("10002/TS_1".to_string(), "RN-300"),
        ("10000/Ünïcode_run_é".to_string(), "RN-243"),
        (format!("{VS}/Annotations/100"), "AN-1123"),
        (format!("{VS}/Annotations/101"), "AN-1129"),
        (format!("{POS}/Reconstructions/VoxelSpacing4.990/Annotations/100"), "AN-69545"),
    ];
    // Listed first (no API call), so the reads below find the folders' listings in memory.
    for (path, _) in &wanted {
        assert!(cryoet_attributes_listed(&mount.join(path)).contains("id"), "{path}");
    }
    let reads = at_once(wanted.iter().map(|(path, _)| mount.join(path)).collect(), |path| {
        cdpfs::stage::xattr(path, "user.cryoet.id")
    });
    for ((path, id), read) in wanted.iter().zip(reads) {
        assert_eq!(read.unwrap(), *id, "{path}");
    }
    let counts = api.counts();
    let requests = api.requests();
    eprintln!(
        "ids of {} folders of two kinds read at once: {requests} requests {}",
        wanted.len(),
        counts["operations"]
    );
    // One `_in` query per kind; a read the kernel delivers after the 20 ms window may add one.
    assert!((2..=4).contains(&requests), "{requests} requests for {} ids: {}", wanted.len(), counts["operations"]);
}

/// `op` on each of `paths`, from threads of their own started together; the results in order.
fn at_once<T: Send + 'static>(paths: Vec<PathBuf>, op: fn(&Path) -> T) -> Vec<T> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(paths.len()));
    let threads: Vec<_> = paths
        .into_iter()
        .map(|path| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                op(&path)
            })
        })
        .collect();
    threads.into_iter().map(|thread| thread.join().unwrap()).collect()
}

/// The `user.cryoet.*` attribute names `path` lists, without the prefix.
fn cryoet_attributes_listed(path: &Path) -> BTreeSet<String> {
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: the path is NUL-terminated and the buffer is valid for its length.
    let n = unsafe { libc::listxattr(c_path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "listxattr {}: {}", path.display(), std::io::Error::last_os_error());
    names.truncate(n as usize);
    names
        .split(|b| *b == 0)
        .filter_map(|name| Some(std::str::from_utf8(name).ok()?.strip_prefix("user.cryoet.")?.to_owned()))
        .collect()
}

#[test]
fn facet_folders_list_the_fixtures_datasets_and_runs() {
    let Some(api) = Api::start() else { return };
    let mount = mount("facets", &api.url(), &[]);
    let listing = |path: &str| -> BTreeMap<String, String> {
        fs::read_dir(mount.join(path))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let target = fs::read_link(e.path()).map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
                (e.file_name().into_string().unwrap(), target)
            })
            .collect()
    };
    let organisms = listing("by-organism");
    assert_eq!(organisms.keys().collect::<Vec<_>>(), ["Saccharomyces cerevisiae", "Schizosaccharomyces pombe"]);
    let pombe = listing("by-organism/Schizosaccharomyces pombe");
    assert_eq!(pombe, attrs(&[("DS-10000", "../../10000"), ("DS-10002", "../../10002")]));
    assert_eq!(listing("by-organism/Saccharomyces cerevisiae"), attrs(&[("DS-10001", "../../10001")]));
    assert_eq!(listing("by-sample-type/organism"), pombe);
    assert_eq!(listing("by-sample-type/cell"), attrs(&[("DS-10001", "../../10001")]));
    assert_eq!(listing("by-sample-type").keys().collect::<Vec<_>>(), ["cell", "organism"]);
    assert_eq!(api.requests(), 1, "the whole by-organism and by-sample-type trees from one paged list");

    let objects = listing("by-object");
    assert_eq!(objects.keys().collect::<Vec<_>>(), ["cytosolic ribosome", "membrane"]);
    let ribosome = listing("by-object/cytosolic ribosome");
    let want = attrs(&[
        ("DS-10000", "../../10000"),
        ("DS-10001", "../../10001"),
        ("RN-241", "../../10000/TS_026"),
        ("RN-17687", "../../10001/24apr23a_Position_12"),
    ]);
    assert_eq!(ribosome, want);
    assert_eq!(listing("by-object/membrane"), attrs(&[("DS-10000", "../../10000"), ("RN-241", "../../10000/TS_026")]));
    assert_eq!(api.requests(), 4, "one aggregate for the objects, one list per object");
    // Links lead into the tree.
    let through = mount.join("by-object/membrane/RN-241/run_metadata.json");
    assert!(common::read_whole(&through) == bucket().0.objects[&format!("{RUN}/run_metadata.json")]);
    assert_eq!(errno_of(fs::read_dir(mount.join("by-object/no such object"))), Some(libc::ENOENT));
    std::thread::sleep(Duration::from_millis(1500));
    listing("by-object/membrane");
    listing("by-organism");
    assert_eq!(api.requests(), 4, "nothing asked again within the TTL");
}

/// On a mount of one dataset (`--prefix 10000/`) the dataset's own id is the mount's root, as
/// the facet folders' links already said; another dataset's id is not in the tree.
#[test]
fn a_prefix_mount_resolves_its_own_dataset_id_to_its_root() {
    let Some(api) = Api::start() else { return };
    let mount = mount("prefix-ids", &api.url(), &["--prefix", "10000/"]);
    assert_eq!(fs::read_link(mount.join("DS-10000")).unwrap(), PathBuf::from("."));
    assert!(mount.join("DS-10000/TS_026").is_dir());
    assert_eq!(fs::read_link(mount.join("RN-241")).unwrap(), PathBuf::from("TS_026"));
    assert_eq!(errno_of(fs::symlink_metadata(mount.join("DS-10001"))), Some(libc::ENOENT));
    // Only the organisms and sample types of datasets under the prefix have folders.
    let names = |path: &str| -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(mount.join(path)).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    };
    assert_eq!(names("by-organism"), ["Schizosaccharomyces pombe"]);
    assert_eq!(names("by-organism/Schizosaccharomyces pombe"), ["DS-10000"]);
    assert_eq!(names("by-sample-type"), ["organism"]);
    assert_eq!(errno_of(fs::metadata(mount.join("by-organism/Saccharomyces cerevisiae"))), Some(libc::ENOENT));
}

#[test]
fn info_describes_any_path_of_a_mount() {
    let Some(api) = Api::start() else { return };
    let mount = mount("info", &api.url(), &[]);
    let run = mount.join("RN-241");
    let out = common::run_cdpfs(&["info", run.to_str().unwrap()], Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    let mrc_size = bucket().0.objects[&format!("{TOMO_DIR}/TS_026.mrc")].len();
    for line in [
        "(run RN-241)",
        "  key: 10000/TS_026",
        "  run_name: TS_026",
        "Reconstructions/VoxelSpacing13.480/Tomograms/100  (tomogram TM-621)",
        &format!("TS_026.mrc  {mrc_size} bytes"),
        "Reconstructions/VoxelSpacing13.480/Annotations/101  (annotation AN-1129)",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    let out = common::run_cdpfs(&["info", "--json", run.to_str().unwrap()], Duration::from_secs(30));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["key"], RUN);
    assert_eq!(report["metadata"]["id"], "RN-241");
    let contents = report["contents"].as_array().unwrap();
    let kinds: Vec<(&str, &str)> =
        contents.iter().map(|c| (c["path"].as_str().unwrap(), c["metadata"]["kind"].as_str().unwrap())).collect();
    assert_eq!(
        kinds,
        [
            ("Reconstructions/VoxelSpacing13.480/Annotations/100", "annotation"),
            ("Reconstructions/VoxelSpacing13.480/Annotations/101", "annotation"),
            ("Reconstructions/VoxelSpacing13.480/Tomograms/100", "tomogram"),
        ]
    );
    assert_eq!(contents[2]["metadata"]["voxel_spacing"], "13.48");
    assert_eq!(contents[2]["metadata"]["id"], "TM-621");
    // The MRC files beside the metadata, with the binned views of the OME-Zarr.
    let files: Vec<&str> = contents[2]["files"].as_array().unwrap().iter().map(|f| f[0].as_str().unwrap()).collect();
    assert_eq!(files, ["TS_026.bin2.mrc", "TS_026.bin4.mrc", "TS_026.mrc"]);
    assert_eq!(contents[2]["files"][2], json!(["TS_026.mrc", mrc_size]));
    assert_eq!(contents[1]["metadata"]["object_name"], "membrane");
    // A dataset: its runs. A file: its folder's metadata.
    let out = common::run_cdpfs(&["info", "--json", mount.join("DS-10000").to_str().unwrap()], Duration::from_secs(30));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["metadata"]["organism"], "Schizosaccharomyces pombe");
    let runs: Vec<&str> = report["contents"].as_array().unwrap().iter().map(|c| c["path"].as_str().unwrap()).collect();
    assert_eq!(runs, ["TS with space", "TS_026", "Ünïcode_run_é"]);
    let out = common::run_cdpfs(&["info", "--json", mount.join("TM-621").to_str().unwrap()], Duration::from_secs(30));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["key"], format!("{TOMO_DIR}/TS_026.mrc"));
    assert_eq!((&report["metadata"]["kind"], &report["metadata"]["id"]), (&json!("tomogram"), &json!("TM-621")));
    assert_eq!(report["contents"], json!([]));
    // A facet folder is the mount's, not the bucket's: no key.
    let out =
        common::run_cdpfs(&["info", "--json", mount.join("by-organism").to_str().unwrap()], Duration::from_secs(30));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&report["key"], &report["kind"]), (&Value::Null, &json!("folder")));
    // Bad input: a clear error and a non-zero exit.
    for (path, message) in [("/nonexistent/x", "cannot open"), ("/tmp", "is not under a cdpfs mount")] {
        let out = common::run_cdpfs(&["info", path], Duration::from_secs(10));
        assert!(!out.status.success(), "{path}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(message),
            "{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn ids_looked_up_together_go_to_the_api_in_one_batch() {
    let Some(api) = Api::start() else { return };
    let mount = mount("batch", &api.url(), &[]);
    let wanted = [
        ("RN-241", Some(RUN)),
        ("RN-243", Some("10000/Ünïcode_run_é")),
        ("RN-17687", Some(POS)),
        ("RN-300", Some("10002/TS_1")),
        ("RN-999999", None),
        ("AN-1123", Some("10000/TS_026/Reconstructions/VoxelSpacing13.480/Annotations/100")),
        ("AN-69545", Some("10001/24apr23a_Position_12/Reconstructions/VoxelSpacing4.990/Annotations/100")),
    ];
    let lookups = at_once(wanted.iter().map(|(name, _)| mount.join(name)).collect(), |link| fs::read_link(link));
    for ((name, target), lookup) in wanted.iter().zip(lookups) {
        match (target, lookup) {
            (Some(target), Ok(got)) => assert_eq!(got, PathBuf::from(target), "{name}"),
            (None, Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{name}"),
            (target, got) => panic!("{name}: wanted {target:?}, got {got:?}"),
        }
    }
    let counts = api.counts();
    let requests = api.requests();
    eprintln!("{} ids of two kinds looked up at once: {requests} requests {}", wanted.len(), counts["operations"]);
    // One `_in` query per kind; a lookup the kernel delivers after the 20 ms window may add one.
    assert!((2..=4).contains(&requests), "{requests} requests for {} ids: {}", wanted.len(), counts["operations"]);
}

#[test]
fn a_bad_api_url_or_timeout_is_a_clear_error_and_nothing_is_mounted() {
    common::require_fuse();
    let server = &bucket().1;
    let path = common::scratch_dir("mnt-bad-api");
    let endpoint = server.addr_url();
    for (extra, message) in [
        (["--api-url", "ftp://example.org/graphql"], "invalid --api-url"),
        (["--api-url", "not a url"], "invalid --api-url"),
        (["--api-timeout", "soon"], "--api-timeout"),
    ] {
        let mut args = vec!["mount", path.to_str().unwrap(), "--bucket", common::BUCKET, "--endpoint-url", &endpoint];
        args.extend_from_slice(&extra);
        let out = common::run_cdpfs(&args, Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(message), "{extra:?}: {stderr}");
        assert!(!common::is_mounted(&path), "{extra:?} mounted");
    }
}

#[test]
fn mounts_sharing_a_cache_dir_that_look_up_an_id_at_once_send_one_query() {
    let Some(api) = Api::start() else { return };
    let cache = common::scratch_dir("portal-cache-herd");
    let cache_arg = ["--cache-dir", cache.to_str().unwrap()];
    let mounts: Vec<Mounted> = (0..3).map(|i| mount(&format!("herd-{i}"), &api.url(), &cache_arg)).collect();
    for lookup in at_once(mounts.iter().map(|mount| mount.join("TM-621")).collect(), |link| fs::read_link(link)) {
        assert_eq!(lookup.unwrap(), PathBuf::from(IDS[2].1));
    }
    assert_eq!(api.requests(), 1, "three mounts on one cache dir asked for one id at once");
}
