//! A WAN-like S3 origin on loopback: an in-memory bucket served through the s3s protocol
//! implementation, with a fixed first-byte latency per request and a bandwidth cap per TCP
//! connection, so that parallel connections (not the server) set the throughput, as on real S3.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use s3s::dto::{
    CommonPrefix, ETag, GetObjectInput, GetObjectOutput, ListObjectsV2Input, ListObjectsV2Output, Object,
    StreamingBlob, Timestamp,
};
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How the origin imitates S3 seen from outside its region.
#[derive(Clone, Copy, Debug)]
pub struct Shaping {
    /// Delay before each response starts.
    pub latency: Duration,
    /// Bytes per second per TCP connection.
    pub bytes_per_sec: u64,
}

/// What the origin served.
#[derive(Default, Debug)]
pub struct Counters {
    pub gets: AtomicU64,
    pub lists: AtomicU64,
    pub bytes: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (self.gets.load(Ordering::SeqCst), self.lists.load(Ordering::SeqCst), self.bytes.load(Ordering::SeqCst))
    }
}

struct Stored {
    data: Bytes,
    etag: String,
}

/// The in-memory bucket.
pub struct Origin {
    bucket: String,
    objects: BTreeMap<String, Stored>,
    shaping: Shaping,
    counters: Arc<Counters>,
    created: SystemTime,
}

impl Origin {
    /// Starts serving `objects` as `bucket` on 127.0.0.1; returns the address and counters.
    pub fn start(bucket: &str, objects: BTreeMap<String, Bytes>, shaping: Shaping) -> (SocketAddr, Arc<Counters>) {
        let counters = Arc::new(Counters::default());
        let origin = Origin {
            bucket: bucket.to_owned(),
            objects: objects
                .into_iter()
                .enumerate()
                .map(|(i, (k, data))| (k, Stored { data, etag: format!("\"{i:032x}\"") }))
                .collect(),
            shaping,
            counters: counters.clone(),
            created: SystemTime::now(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            runtime.block_on(async move {
                let service = s3s::service::S3ServiceBuilder::new(origin).build();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let Ok((socket, _)) = listener.accept().await else { continue };
                    let _ = socket.set_nodelay(true);
                    let service = service.clone();
                    let io = Throttled::new(socket, shaping.bytes_per_sec);
                    tokio::spawn(async move {
                        let builder =
                            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                        let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service).await;
                    });
                }
            });
        });
        (rx.recv().unwrap(), counters)
    }
}

#[async_trait::async_trait]
impl S3 for Origin {
    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> S3Result<S3Response<ListObjectsV2Output>> {
        tokio::time::sleep(self.shaping.latency).await;
        self.counters.lists.fetch_add(1, Ordering::SeqCst);
        let input = req.input;
        if input.bucket != self.bucket {
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
                    size: Some(stored.data.len() as i64),
                    e_tag: Some(ETag::Strong(stored.etag.trim_matches('"').to_owned())),
                    last_modified: Some(Timestamp::from(self.created)),
                    ..Default::default()
                });
            }
        }
        let output = ListObjectsV2Output {
            name: Some(self.bucket.clone()),
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
        tokio::time::sleep(self.shaping.latency).await;
        let input = req.input;
        let stored = self.objects.get(&input.key).ok_or_else(|| s3_error!(NoSuchKey))?;
        if let Some(condition) = &input.if_match {
            let wanted = format!("{condition:?}");
            if !wanted.contains(stored.etag.trim_matches('"')) {
                return Err(s3_error!(PreconditionFailed));
            }
        }
        let len = stored.data.len() as u64;
        let (range, content_range) = match input.range {
            Some(r) => {
                let range = r.check(len)?;
                let header = format!("bytes {}-{}/{len}", range.start, range.end - 1);
                (range, Some(header))
            }
            None => (0..len, None),
        };
        self.counters.gets.fetch_add(1, Ordering::SeqCst);
        self.counters.bytes.fetch_add(range.end - range.start, Ordering::SeqCst);
        let body = stored.data.slice(range.start as usize..range.end as usize);
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            (0..body.len()).step_by(256 << 10).map(|i| Ok(body.slice(i..(i + (256 << 10)).min(body.len())))).collect();
        let output = GetObjectOutput {
            body: Some(StreamingBlob::wrap(futures_util::stream::iter(chunks))),
            content_length: Some(body.len() as i64),
            content_range,
            e_tag: Some(ETag::Strong(stored.etag.trim_matches('"').to_owned())),
            last_modified: Some(Timestamp::from(self.created)),
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }
}

/// A TCP stream whose writes are paced to a fixed rate.
struct Throttled {
    inner: TcpStream,
    bytes_per_sec: f64,
    epoch: Instant,
    sent: f64,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Throttled {
    fn new(inner: TcpStream, bytes_per_sec: u64) -> Throttled {
        Throttled { inner, bytes_per_sec: bytes_per_sec as f64, epoch: Instant::now(), sent: 0.0, sleep: None }
    }
}

impl AsyncRead for Throttled {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Throttled {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
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
        let max = buf.len().min(64 << 10);
        let written = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &buf[..max]))?;
        self.sent += written as f64;
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
