//! A WAN-like S3 origin on loopback, in its own process: the bench binary run again with
//! `--serve-origin DIR`, serving the files under DIR (key = path below DIR) through the s3s
//! protocol implementation, with a fixed first-byte latency per request and a bandwidth cap per
//! TCP connection, so that parallel connections (not the server) set the throughput, as on real
//! S3. Each GET reads just its range from the file, 256 KiB at a time.
//!
//! The child prints its port on stdout and exits when its stdin closes (the parent died) or when
//! [`OriginProcess`] is dropped. It counts GETs, LIST pages and body bytes sent; a GET of the
//! reserved key [`COUNTERS_KEY`] (not counted, not delayed) answers them as JSON
//! `{"gets":N,"lists":N,"bytes":N,"cpu_us":N}` (`cpu_us`: the origin process's CPU time so far),
//! which [`OriginProcess::counters`] reads.

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use s3s::dto::{
    CommonPrefix, ETag, ETagCondition, GetObjectInput, GetObjectOutput, ListObjectsV2Input, ListObjectsV2Output,
    Object, StreamingBlob, Timestamp,
};
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::fixture;

/// The key whose GET returns the counters.
pub const COUNTERS_KEY: &str = "__counters";
/// Bytes read from the file and sent per body chunk.
const BODY_CHUNK: u64 = 256 << 10;

/// How the origin imitates S3 seen from outside its region.
#[derive(Clone, Copy, Debug)]
pub struct Shaping {
    /// Delay before each response starts.
    pub latency: Duration,
    /// Bytes per second per TCP connection.
    pub bytes_per_sec: u64,
}

/// What the origin has served so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub gets: u64,
    pub lists: u64,
    pub bytes: u64,
    /// CPU seconds the origin process has used.
    pub cpu: f64,
}

/// The origin process, from the parent's side; killed on drop.
pub struct OriginProcess {
    child: Child,
    /// Held open: the child exits when it closes.
    _stdin: ChildStdin,
    addr: SocketAddr,
}

impl OriginProcess {
    /// Starts serving `dir` as the bench's bucket.
    pub fn start(dir: &Path, shaping: Shaping) -> OriginProcess {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .arg("--serve-origin")
            .arg(dir)
            .args(["--latency-ms", &shaping.latency.as_millis().to_string()])
            .args(["--bandwidth-mbps", &(shaping.bytes_per_sec / 1_000_000).to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port: u16 = line.trim().parse().unwrap_or_else(|_| panic!("origin printed {line:?}, not a port"));
        let stdin = child.stdin.take().unwrap();
        OriginProcess { child, _stdin: stdin, addr: SocketAddr::from(([127, 0, 0, 1], port)) }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The origin's counters now (one plain HTTP GET of [`COUNTERS_KEY`]).
    pub fn counters(&self) -> Counters {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        let request = format!(
            "GET /{}/{COUNTERS_KEY} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            fixture::BUCKET,
            self.addr
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let json = &response[response.find('{').unwrap()..=response.rfind('}').unwrap()];
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        let field = |name: &str| value[name].as_u64().unwrap();
        Counters {
            gets: field("gets"),
            lists: field("lists"),
            bytes: field("bytes"),
            cpu: field("cpu_us") as f64 / 1e6,
        }
    }
}

impl Drop for OriginProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's side: serves `dir` until stdin closes. Never returns.
pub fn serve(dir: &Path, shaping: Shaping) -> ! {
    let origin = Origin::new(dir, shaping);
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let service = s3s::service::S3ServiceBuilder::new(origin).build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap().port());
        std::io::stdout().flush().unwrap();
        loop {
            let Ok((socket, _)) = listener.accept().await else { continue };
            let _ = socket.set_nodelay(true);
            let service = service.clone();
            let io = Throttled::new(socket, shaping.bytes_per_sec);
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service).await;
            });
        }
    })
}

/// One served file.
struct Stored {
    path: PathBuf,
    size: u64,
    etag: String,
    mtime: SystemTime,
}

#[derive(Default)]
struct AtomicCounters {
    gets: AtomicU64,
    lists: AtomicU64,
    bytes: AtomicU64,
}

/// The bucket: an index of the files, read when asked.
struct Origin {
    objects: BTreeMap<String, Stored>,
    shaping: Shaping,
    counters: Arc<AtomicCounters>,
}

impl Origin {
    fn new(dir: &Path, shaping: Shaping) -> Origin {
        let mut objects = BTreeMap::new();
        index(dir, dir, &mut objects);
        Origin { objects, shaping, counters: Arc::default() }
    }

    fn counters_json(&self) -> S3Result<S3Response<GetObjectOutput>> {
        let c = &self.counters;
        let json = format!(
            r#"{{"gets":{},"lists":{},"bytes":{},"cpu_us":{}}}"#,
            c.gets.load(Ordering::SeqCst),
            c.lists.load(Ordering::SeqCst),
            c.bytes.load(Ordering::SeqCst),
            (crate::raw::cpu_seconds() * 1e6) as u64
        );
        let output = GetObjectOutput {
            content_length: Some(json.len() as i64),
            body: Some(StreamingBlob::wrap(futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(json))]))),
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }
}

/// Adds every file below `dir` to `objects`, keyed by its path below `root`.
fn index(root: &Path, dir: &Path, objects: &mut BTreeMap<String, Stored>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let (path, meta) = (entry.path(), entry.metadata().unwrap());
        if meta.is_dir() {
            index(root, &path, objects);
            continue;
        }
        let key = path.strip_prefix(root).unwrap().to_str().unwrap().to_owned();
        let stored = Stored {
            size: meta.len(),
            etag: fixture::etag(&meta),
            mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            path,
        };
        objects.insert(key, stored);
    }
}

/// Whether an `If-Match` condition holds for `etag` (unquoted).
fn matches(condition: &ETagCondition, etag: &str) -> bool {
    condition.as_etag().is_none_or(|wanted| wanted.value() == etag)
}

/// The body of a GET: `range` of `file`, read `BODY_CHUNK` at a time as the connection takes it,
/// each chunk counted as it is sent.
fn body(
    file: File,
    range: Range<u64>,
    counters: Arc<AtomicCounters>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static {
    let file = Arc::new(file);
    futures_util::stream::try_unfold(range.start, move |at| {
        let (file, counters, end) = (file.clone(), counters.clone(), range.end);
        async move {
            if at >= end {
                return Ok(None);
            }
            let len = (end - at).min(BODY_CHUNK);
            let chunk = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, at).map(|()| Bytes::from(buf))
            })
            .await
            .map_err(std::io::Error::other)??;
            counters.bytes.fetch_add(len, Ordering::SeqCst);
            Ok(Some((chunk, at + len)))
        }
    })
}

#[async_trait::async_trait]
impl S3 for Origin {
    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> S3Result<S3Response<ListObjectsV2Output>> {
        tokio::time::sleep(self.shaping.latency).await;
        self.counters.lists.fetch_add(1, Ordering::SeqCst);
        let input = req.input;
        if input.bucket != fixture::BUCKET {
            return Err(s3_error!(NoSuchBucket));
        }
        let prefix = input.prefix.clone().unwrap_or_default();
        let max_keys = input.max_keys.unwrap_or(1000).clamp(1, 1000) as usize;
        let after = input.continuation_token.clone().or(input.start_after.clone()).unwrap_or_default();
        let mut contents = Vec::new();
        let mut prefixes: Vec<String> = Vec::new();
        let mut last = None;
        let mut truncated = false;
        for (key, stored) in self.objects.range(prefix.clone()..) {
            if !key.starts_with(&prefix) {
                break;
            }
            let rest = &key[prefix.len()..];
            let entry = match (input.delimiter.as_deref(), rest.find('/')) {
                (Some("/"), Some(i)) => format!("{prefix}{}", &rest[..=i]),
                _ => key.clone(),
            };
            if entry <= after || prefixes.last() == Some(&entry) {
                continue;
            }
            if contents.len() + prefixes.len() == max_keys {
                truncated = true;
                break;
            }
            last = Some(entry.clone());
            if entry.ends_with('/') && entry != *key {
                prefixes.push(entry);
            } else {
                contents.push(Object {
                    key: Some(key.clone()),
                    size: Some(stored.size as i64),
                    e_tag: Some(ETag::Strong(stored.etag.clone())),
                    last_modified: Some(Timestamp::from(stored.mtime)),
                    ..Default::default()
                });
            }
        }
        let output = ListObjectsV2Output {
            name: Some(fixture::BUCKET.to_owned()),
            prefix: Some(prefix),
            delimiter: input.delimiter,
            max_keys: Some(max_keys as i32),
            key_count: Some((contents.len() + prefixes.len()) as i32),
            is_truncated: Some(truncated),
            next_continuation_token: if truncated { last } else { None },
            continuation_token: input.continuation_token,
            contents: Some(contents),
            common_prefixes: Some(prefixes.into_iter().map(|p| CommonPrefix { prefix: Some(p) }).collect()),
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }

    async fn get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        let input = req.input;
        if input.key == COUNTERS_KEY {
            return self.counters_json();
        }
        tokio::time::sleep(self.shaping.latency).await;
        let stored = self.objects.get(&input.key).ok_or_else(|| s3_error!(NoSuchKey))?;
        if input.if_match.as_ref().is_some_and(|condition| !matches(condition, &stored.etag)) {
            return Err(s3_error!(PreconditionFailed));
        }
        let len = stored.size;
        let (range, content_range) = match input.range {
            Some(r) => {
                let range = r.check(len)?;
                (range.clone(), Some(format!("bytes {}-{}/{len}", range.start, range.end.saturating_sub(1))))
            }
            None => (0..len, None),
        };
        let file = File::open(&stored.path).map_err(|e| s3_error!(InternalError, "{e}"))?;
        self.counters.gets.fetch_add(1, Ordering::SeqCst);
        let output = GetObjectOutput {
            content_length: Some((range.end - range.start) as i64),
            body: Some(StreamingBlob::wrap(body(file, range, self.counters.clone()))),
            content_range,
            e_tag: Some(ETag::Strong(stored.etag.clone())),
            last_modified: Some(Timestamp::from(stored.mtime)),
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }
}

/// A TCP stream whose writes are paced to a fixed rate.
struct Throttled {
    inner: tokio::net::TcpStream,
    bytes_per_sec: f64,
    epoch: Instant,
    sent: f64,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Throttled {
    fn new(inner: tokio::net::TcpStream, bytes_per_sec: u64) -> Throttled {
        Throttled { inner, bytes_per_sec: bytes_per_sec as f64, epoch: Instant::now(), sent: 0.0, sleep: None }
    }
}

impl AsyncRead for Throttled {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl Throttled {
    /// Ready when the pace allows the next write.
    fn poll_pace(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let now = Instant::now();
        let allowed_at = self.epoch + Duration::from_secs_f64(self.sent / self.bytes_per_sec);
        if allowed_at + Duration::from_millis(20) < now {
            // Idle for a while: no credit for the silence beyond a small burst.
            self.epoch = now;
            self.sent = 0.0;
        } else if allowed_at > now {
            let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(allowed_at.into())));
            sleep.as_mut().reset(allowed_at.into());
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        Poll::Ready(())
    }
}

/// At most this much goes out in one write (the pace's granularity).
const WRITE_MAX: usize = 64 << 10;

impl AsyncWrite for Throttled {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_pace(cx));
        let max = buf.len().min(WRITE_MAX);
        let written = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &buf[..max]))?;
        self.sent += written as f64;
        Poll::Ready(Ok(written))
    }

    /// Vectored, so that hyper sends body chunks as they are instead of copying them into
    /// its own buffer first.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_pace(cx));
        let mut room = WRITE_MAX;
        let slices: Vec<std::io::IoSlice<'_>> = bufs
            .iter()
            .map_while(|buf| {
                let take = buf.len().min(room);
                room -= take;
                (take > 0).then(|| std::io::IoSlice::new(&buf[..take]))
            })
            .collect();
        let written = std::task::ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &slices))?;
        self.sent += written as f64;
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
