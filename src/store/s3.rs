//! The real [`ObjectStore`]: aws-sdk-s3 against AWS S3 or any S3-compatible endpoint.
//!
//! Retries live here and only here: the SDK's own retry loop is switched off so that one policy
//! (jittered exponential backoff, a timeout per attempt that also covers the body, a bound on
//! the total time) governs listings and reads alike, including failures that happen mid-body.

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::BuildHasher;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{BehaviorVersion, Region, StalledStreamProtectionConfig};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use tracing::{debug, warn};

use super::http::{PieceClient, PieceSize};
use super::{ObjectMeta, ObjectStore, PieceSink, PrefixListing, StoreCounters, StoreError, StoreFuture};

/// Where the bucket is and how to talk to it.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Region used for signing and endpoint resolution.
    pub region: String,
    /// A custom endpoint (MinIO, a site mirror or caching proxy); implies path-style addressing.
    pub endpoint_url: Option<String>,
    /// Sign requests with the standard AWS credential chain instead of sending them anonymously.
    pub sign_requests: bool,
    /// How persistent the client is before it gives up on one request.
    pub retry: RetryPolicy,
}

/// How a failed request is retried.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// Time allowed for one attempt of a GET, body included, on top of the transfer allowance
    /// (a listing page gets the stall timeout, at most this).
    pub attempt_timeout: Duration,
    /// An attempt whose body delivers no data for this long is abandoned and retried.
    pub stall_timeout: Duration,
    /// Upper bound on the time spent on one request across all its attempts.
    pub total_timeout: Duration,
    /// First backoff; it doubles per attempt (full jitter), capped at `max_backoff`.
    pub base_backoff: Duration,
    /// Largest backoff between two attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            attempt_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(30),
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// The outcome of one failed attempt: give up now, or try again.
enum AttemptError {
    Final(StoreError),
    Transient(String),
    /// No answer at all (connection refused, DNS, connect timeout): also retried.
    NoConnection(String),
}

/// How long opening a connection to the endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// S3 client for one bucket.
pub struct S3Store {
    client: Client,
    bucket: String,
    retry: RetryPolicy,
    counters: Arc<StoreCounters>,
    /// Whether GET bodies arrive in buffers of their own, one per piece ([`PieceClient`]).
    own_pieces: bool,
}

impl S3Store {
    /// Builds a client. Only reads local configuration; sends nothing.
    pub async fn new(config: &S3Config) -> S3Store {
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder().connect_timeout(CONNECT_TIMEOUT).build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
            .timeout_config(timeouts);
        if !config.sign_requests {
            loader = loader.no_credentials();
        }
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let shared = loader.load().await;
        let endpoint = match &config.endpoint_url {
            Some(url) => url.clone(),
            None => format!("https://{}.s3.{}.amazonaws.com", config.bucket, config.region),
        };
        let http_client = PieceClient::new(CONNECT_TIMEOUT, config.retry.stall_timeout, &endpoint);
        let own_pieces = http_client.reads_into_pieces();
        let s3_config = aws_sdk_s3::config::Builder::from(&shared)
            .http_client(http_client)
            .force_path_style(config.endpoint_url.is_some())
            // Our own attempt timeout covers stalled bodies, and unlike the SDK's stall
            // protection its failures are retried.
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .build();
        S3Store {
            client: Client::from_conf(s3_config),
            bucket: config.bucket.clone(),
            retry: config.retry,
            counters: Arc::default(),
            own_pieces,
        }
    }

    /// What this store has sent and received so far.
    pub fn counters(&self) -> Arc<StoreCounters> {
        self.counters.clone()
    }

    /// Runs `attempt` under the retry policy, each attempt given at most `attempt_limit`. `what`
    /// names the request (and its key or prefix) in logs and errors; every request that fails
    /// for good logs exactly one warning.
    async fn with_retries<T, F, Fut>(&self, what: &str, attempt_limit: Duration, attempt: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, AttemptError>>,
    {
        let started = Instant::now();
        let mut last_error = String::new();
        let mut connected = false;
        let mut attempts = 0;
        for n in 0..self.retry.max_attempts {
            if n > 0 {
                let backoff = jittered_backoff(&self.retry, n);
                if started.elapsed() + backoff >= self.retry.total_timeout {
                    break;
                }
                debug!(what, attempt = n + 1, ?backoff, error = %last_error, "retrying");
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
            }
            let remaining = self.retry.total_timeout.saturating_sub(started.elapsed());
            let limit = attempt_limit.min(remaining);
            attempts += 1;
            match tokio::time::timeout(limit, attempt()).await {
                Ok(Ok(value)) => {
                    self.answered();
                    return Ok(value);
                }
                Ok(Err(AttemptError::Final(e))) => {
                    self.answered();
                    // A missing bucket is the mount's own error (`cdpfs mount` reports it and
                    // exits), not one request's.
                    if !matches!(e, StoreError::NoSuchBucket(_)) {
                        warn!(what, error = %e, "S3 request failed");
                    }
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
                Ok(Err(AttemptError::Transient(msg))) => {
                    connected = true;
                    last_error = msg;
                }
                Ok(Err(AttemptError::NoConnection(msg))) => last_error = msg,
                Err(_) => last_error = format!("the last attempt had no complete answer within its {limit:.1?}"),
            }
        }
        // What the request as a whole went through, not only its last attempt.
        let last_error = format!("{last_error} (gave up after {attempts} attempts in {:.1?})", started.elapsed());
        warn!(what, error = %last_error, "S3 request failed after retries");
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        Err(if connected {
            StoreError::Failed(format!("{what}: {last_error}"))
        } else {
            if !self.counters.unreachable.swap(true, Ordering::Relaxed) {
                warn!("S3 is unreachable: serving saved listings and cached blocks; reads of anything else fail until it answers again");
                self.probe_until_reachable();
            }
            StoreError::Unreachable(last_error)
        })
    }

    /// While S3 is unreachable, asks it for one key every `--request-timeout` (in the
    /// background), so a mount that only lists saved folders also notices when it is back.
    fn probe_until_reachable(&self) {
        let (client, bucket, counters) = (self.client.clone(), self.bucket.clone(), self.counters.clone());
        let every = self.retry.total_timeout.max(Duration::from_secs(1));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            while counters.is_unreachable() {
                tokio::time::sleep(every).await;
                let answer =
                    tokio::time::timeout(every, client.list_objects_v2().bucket(&bucket).max_keys(1).send()).await;
                // Any answer, even an error status, means the endpoint is back.
                let reached = match answer {
                    Ok(Ok(_)) => true,
                    Ok(Err(e)) => !matches!(classify(&bucket, "", e), AttemptError::NoConnection(_)),
                    Err(_) => false,
                };
                if reached && counters.unreachable.swap(false, Ordering::Relaxed) {
                    tracing::info!("S3 answers again");
                }
            }
        });
    }

    /// Notes that S3 answered (after being unreachable: says so).
    fn answered(&self) {
        if self.counters.unreachable.swap(false, Ordering::Relaxed) {
            tracing::info!("S3 answers again");
        }
    }

    /// One listing page under `prefix`: its immediate children when `delimited`, else every
    /// object below it.
    async fn list_page(&self, prefix: &str, delimited: bool, token: Option<String>) -> Result<ListPage, AttemptError> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_delimiter(delimited.then(|| "/".to_owned()))
            .set_continuation_token(token)
            .send()
            .await
            .map_err(|e| match classify(&self.bucket, prefix, e) {
                // A listing has no key to be missing: a 404 means the bucket is not there.
                AttemptError::Final(StoreError::NotFound(_)) => {
                    AttemptError::Final(StoreError::NoSuchBucket(self.bucket.clone()))
                }
                other => other,
            })?;
        // A body cut short at an element boundary can still parse (the SDK's parser stops at the
        // cut): the page then lists fewer entries than its KeyCount (objects and prefixes) says.
        let listed = out.contents().len() + out.common_prefixes().len();
        if let Some(count) = missing_entries(listed, out.key_count()) {
            return Err(AttemptError::Transient(format!(
                "listing page of {prefix:?} holds {listed} of the {count} entries it announces (body cut short)"
            )));
        }
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        let prefixes = out.common_prefixes().iter().filter_map(|p| p.prefix().map(str::to_owned)).collect();
        let objects = out
            .contents()
            .iter()
            .filter_map(|o| {
                let size = u64::try_from(o.size().unwrap_or(0)).unwrap_or(0);
                let mtime =
                    o.last_modified().and_then(|t| SystemTime::try_from(*t).ok()).unwrap_or(SystemTime::UNIX_EPOCH);
                let etag = match o.e_tag() {
                    Some(etag) if !etag.is_empty() => etag.to_owned(),
                    _ => ObjectMeta::synthesized_version(size, mtime),
                };
                Some(ObjectMeta { key: o.key()?.to_owned(), size, etag, mtime })
            })
            .collect();
        let next =
            if out.is_truncated() == Some(true) { out.next_continuation_token().map(str::to_owned) } else { None };
        Ok(ListPage { prefixes, objects, next })
    }

    /// Every page of a listing of `prefix`.
    async fn list_pages(&self, prefix: &str, delimited: bool) -> Result<PrefixListing, StoreError> {
        let mut listing = PrefixListing::default();
        let mut token = None;
        loop {
            let what = format!("list s3://{}/{prefix}", self.bucket);
            // The SDK reads a page's body whole, so its chunks cannot be watched: a page that has
            // not arrived within the stall timeout counts as stalled.
            let limit = self.retry.stall_timeout.min(self.retry.attempt_timeout);
            let page = self.with_retries(&what, limit, || self.list_page(prefix, delimited, token.clone())).await?;
            listing.prefixes.extend(page.prefixes);
            listing.objects.extend(page.objects);
            match page.next {
                Some(next) => token = Some(next),
                None => return Ok(listing),
            }
        }
    }

    async fn get_once(
        &self,
        object: &ObjectMeta,
        range: &Range<u64>,
        piece: u64,
        sink: PieceSink<'_>,
    ) -> Result<(), AttemptError> {
        let mut request = self.client.get_object().bucket(&self.bucket).key(&object.key).range(format!(
            "bytes={}-{}",
            range.start,
            range.end - 1
        ));
        let etag = object.server_etag();
        if let Some(etag) = etag {
            request = request.if_match(etag);
        }
        // Every GET sent is counted, whatever becomes of it; its bytes as they arrive.
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        // The body is then read straight into buffers of one piece each (see `http`).
        let out = request
            .customize()
            .mutate_request(move |request| request.add_extension(PieceSize(piece)))
            .send()
            .await
            .map_err(|e| classify(&self.bucket, &object.key, e))?;
        let changed = || AttemptError::Final(StoreError::Changed(object.key.clone()));
        match (etag, out.e_tag()) {
            (Some(listed), Some(answered)) if answered != listed => return Err(changed()),
            // S3 always names the version it answers with: a 200 without it (a proxy's error
            // page, say) is not the object.
            (Some(_), None) => {
                return Err(AttemptError::Transient(format!("the answer for {} has no ETag", object.key)));
            }
            _ => {}
        }
        // Without an ETag to pin (or a server that ignores If-Match), the size and mtime the
        // answer reports must still be the listed ones.
        let total = out.content_range().and_then(content_range_total);
        if total.is_some_and(|total| total != object.size) {
            return Err(changed());
        }
        let answered_mtime = out.last_modified().and_then(|t| SystemTime::try_from(*t).ok());
        if etag.is_none() && answered_mtime.is_some_and(|t| newer_than_listed(t, object.mtime)) {
            return Err(changed());
        }
        let expected = range.end - range.start;
        if let Some(content_range) = out.content_range() {
            if !content_range_matches(content_range, range) {
                return Err(AttemptError::Transient(format!(
                    "server answered range {content_range:?} for bytes {}-{}",
                    range.start,
                    range.end - 1
                )));
            }
        } else if range.start != 0 || expected != object.size {
            // Only a whole object may come without a Content-Range (a server ignoring Range).
            return Err(AttemptError::Transient("the answer has no Content-Range for a part of the object".into()));
        }
        // (A chunked answer has none; its length is checked as it arrives.)
        if let Some(length) = out.content_length().filter(|&length| u64::try_from(length).ok() != Some(expected)) {
            return Err(AttemptError::Transient(format!(
                "the answer's Content-Length is {length}, not the {expected} bytes asked for"
            )));
        }
        // Read the body chunk by chunk: a connection that goes quiet for the stall timeout is
        // abandoned and the attempt retried, instead of waiting for the whole attempt timeout.
        let mut stream = out.body;
        let mut body = Pieces::new(expected, piece, sink, self.own_pieces);
        loop {
            let chunk = match tokio::time::timeout(self.retry.stall_timeout, stream.next()).await {
                Err(_) => {
                    return Err(AttemptError::Transient(format!(
                        "body of {} stalled: no data for {:?}",
                        object.key, self.retry.stall_timeout
                    )))
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(AttemptError::Transient(format!("body of {}: {e}", object.key))),
                Ok(Some(Ok(chunk))) => chunk,
            };
            self.counters.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if !body.push(chunk) {
                return Err(AttemptError::Transient(format!("body of {} is longer than {expected} bytes", object.key)));
            }
        }
        if body.received != expected {
            return Err(AttemptError::Transient(format!(
                "body of {} has {} bytes, expected {expected}",
                object.key, body.received
            )));
        }
        Ok(())
    }
}

/// A response body being received as pieces of a fixed size, each a buffer of its own, handed
/// on as each one fills. When the chunks come from the receive path in `http` (buffers of their
/// own), one that is exactly the next piece is handed on as it is; other chunks are copied into
/// a piece's buffer, so that no piece keeps memory the cache does not count.
struct Pieces<'a> {
    sink: PieceSink<'a>,
    /// Whether chunks may be buffers of their own (else they are always copied).
    own_chunks: bool,
    done: usize,
    current: BytesMut,
    piece: u64,
    expected: u64,
    received: u64,
}

impl<'a> Pieces<'a> {
    fn new(expected: u64, piece: u64, sink: PieceSink<'a>, own_chunks: bool) -> Pieces<'a> {
        Pieces { sink, own_chunks, done: 0, current: BytesMut::new(), piece: piece.max(1), expected, received: 0 }
    }

    /// Appends `chunk`; false when the body would be longer than expected.
    fn push(&mut self, mut chunk: Bytes) -> bool {
        if self.received + chunk.len() as u64 > self.expected {
            return false;
        }
        while !chunk.is_empty() {
            // The length of the piece being received.
            let whole = self.piece.min(self.expected - self.received + self.current.len() as u64) as usize;
            // A buffer of its own, exactly the piece (hyper's chunks are parts of its read buffers).
            if self.own_chunks && self.current.is_empty() && chunk.len() == whole && chunk.is_unique() {
                self.received += whole as u64;
                self.hand_on(chunk);
                return true;
            }
            if self.current.capacity() == 0 {
                self.current.reserve(whole);
            }
            let take = chunk.len().min(whole - self.current.len());
            self.current.extend_from_slice(&chunk.split_to(take));
            self.received += take as u64;
            if self.current.len() == whole {
                let piece = std::mem::take(&mut self.current).freeze();
                self.hand_on(piece);
            }
        }
        true
    }

    fn hand_on(&mut self, piece: Bytes) {
        (self.sink)(self.done, piece);
        self.done += 1;
    }
}

struct ListPage {
    prefixes: Vec<String>,
    objects: Vec<ObjectMeta>,
    next: Option<String>,
}

impl ObjectStore for S3Store {
    fn reachable(&self) -> bool {
        !self.counters.is_unreachable()
    }

    fn list_prefix<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, PrefixListing> {
        Box::pin(self.list_pages(prefix, true))
    }

    fn list_all<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<ObjectMeta>> {
        Box::pin(async move { Ok(self.list_pages(prefix, false).await?.objects) })
    }

    fn get_range<'a>(&'a self, object: &'a ObjectMeta, range: Range<u64>) -> StoreFuture<'a, Bytes> {
        Box::pin(async move {
            let whole = std::sync::Mutex::new(Bytes::new());
            let sink = |_, bytes| *whole.lock().expect("body poisoned") = bytes;
            self.get_pieces(object, range, u64::MAX, &sink).await?;
            Ok(whole.into_inner().expect("body poisoned"))
        })
    }

    fn get_pieces<'a>(
        &'a self,
        object: &'a ObjectMeta,
        range: Range<u64>,
        piece: u64,
        sink: PieceSink<'a>,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if range.is_empty() {
                return Ok(());
            }
            let what = format!("get s3://{}/{} bytes {}-{}", self.bucket, object.key, range.start, range.end - 1);
            tracing::trace!(%what, "sending");
            // Allow for the transfer itself at a pessimistic 1 MiB/s on top of the attempt timeout.
            let transfer = Duration::from_secs((range.end - range.start) >> 20);
            self.with_retries(&what, self.retry.attempt_timeout + transfer, || {
                self.get_once(object, &range, piece, sink)
            })
            .await
        })
    }
}

/// Sorts an SDK error into a final [`StoreError`] or a transient failure worth retrying. One
/// rule for every request kind (listing pages, metadata and data GETs): see [`class_of`].
fn classify<E>(bucket: &str, key: &str, err: SdkError<E, HttpResponse>) -> AttemptError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = match &err {
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => err.raw_response().map(|r| r.status().as_u16()),
        _ => None,
    };
    let kind = match &err {
        SdkError::DispatchFailure(_) if lacks_credentials(&err) => Failure::NoCredentials,
        SdkError::ConstructionFailure(_) => Failure::Construction,
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => Failure::NoAnswer,
        SdkError::ServiceError(_) => Failure::Service,
        _ => Failure::Response,
    };
    // One short reason for logs and errors: the status and S3 code, else the innermost error.
    let message = match (status, err.code()) {
        (Some(status), Some(code)) => format!("HTTP {status} {code}: {}", err.message().unwrap_or("")),
        (Some(status), None) => format!("HTTP {status}: {}", root_cause(&err)),
        (None, _) => root_cause(&err),
    };
    match class_of(kind, status, err.code()) {
        Class::NoSuchBucket => AttemptError::Final(StoreError::NoSuchBucket(bucket.to_owned())),
        Class::NotFound => AttemptError::Final(StoreError::NotFound(key.to_owned())),
        Class::Changed => AttemptError::Final(StoreError::Changed(key.to_owned())),
        Class::Denied => AttemptError::Final(StoreError::AccessDenied(format!("{key}: {message}"))),
        Class::Invalid if matches!(kind, Failure::NoCredentials) => AttemptError::Final(StoreError::Failed(format!(
            "no AWS credentials to sign requests with (--sign-requests): {message}"
        ))),
        Class::Invalid => AttemptError::Final(StoreError::Failed(format!("{key}: {message}"))),
        Class::Retry => AttemptError::Transient(message),
        Class::NoConnection => AttemptError::NoConnection(root_cause(&err)),
    }
}

/// What kind of SDK failure an error is.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// The request could not even be built.
    Construction,
    /// It could not be signed: no credentials were found (`--sign-requests`).
    NoCredentials,
    /// No answer: connection refused or reset before a response, DNS, connect timeout.
    NoAnswer,
    /// The server answered with an S3 error.
    Service,
    /// An answer came, but its body could not be read or parsed (cut short, garbled).
    Response,
}

/// How a failed attempt is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    NoSuchBucket,
    NotFound,
    Changed,
    Denied,
    Invalid,
    Retry,
    NoConnection,
}

/// The one classification of S3 outcomes. Final: 404 (or `NoSuchKey`/`NoSuchBucket`), 412 and
/// 416 (changed since listed), 401/403, other 4xx, a request that cannot be built. Retried: 5xx, 429, 408, throttling codes,
/// a 2xx whose body was cut short or does not parse, and no answer at all.
fn class_of(kind: Failure, status: Option<u16>, code: Option<&str>) -> Class {
    match (kind, code, status) {
        (Failure::Construction | Failure::NoCredentials, ..) => Class::Invalid,
        (_, Some("NoSuchBucket"), _) => Class::NoSuchBucket,
        (_, Some("NoSuchKey"), _) | (_, _, Some(404)) => Class::NotFound,
        // 416: a range inside the listed size is past the object's end: it shrank.
        (_, Some("PreconditionFailed" | "InvalidRange"), _) | (_, _, Some(412 | 416)) => Class::Changed,
        (_, Some("AccessDenied"), _) | (_, _, Some(401 | 403)) => Class::Denied,
        (_, Some("SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable"), _) => Class::Retry,
        (_, _, Some(s)) if s == 408 || s == 429 || s >= 500 => Class::Retry,
        // The status said all is well but the body did not arrive whole or does not parse (the
        // SDK reports an unparsable success body as a response or as an unhandled service error).
        (_, _, Some(s)) if (200..300).contains(&s) => Class::Retry,
        (_, _, Some(_)) => Class::Invalid,
        (Failure::NoAnswer, _, None) => Class::NoConnection,
        (_, _, None) => Class::Retry,
    }
}

/// Whether `err` comes from the credentials chain finding nothing to sign with (the SDK reports
/// it as a request it could not dispatch, like a connection failure).
fn lacks_credentials(err: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(err), |e| e.source()).any(|e| e.is::<CredentialsError>())
}

/// The innermost error in a chain: for connection failures the one line a user can act on.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

/// True when a `Content-Range: bytes a-b/n` header describes exactly `range`.
fn content_range_matches(header: &str, range: &Range<u64>) -> bool {
    let Some(spec) = header.trim().strip_prefix("bytes ") else {
        return false;
    };
    let Some((span, _total)) = spec.split_once('/') else {
        return false;
    };
    let Some((first, last)) = span.split_once('-') else {
        return false;
    };
    first.parse::<u64>().ok() == Some(range.start) && last.parse::<u64>().ok() == Some(range.end - 1)
}

/// The object size a `Content-Range: bytes a-b/n` header reports (`None` for `*` or garbage).
fn content_range_total(header: &str) -> Option<u64> {
    header.trim().strip_prefix("bytes ")?.split_once('/')?.1.parse().ok()
}

/// Whether a `Last-Modified` answer (whole seconds) says the object is newer than the listed
/// mtime (which may carry a fraction of a second). An unknown listed mtime never is.
fn newer_than_listed(answered: SystemTime, listed: SystemTime) -> bool {
    let secs = |t: SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    listed != SystemTime::UNIX_EPOCH && secs(answered) > secs(listed)
}

/// The entries a listing page announces (`KeyCount`: objects and common prefixes) when it holds
/// fewer (`listed`); `None` when it holds them all or announces nothing.
fn missing_entries(listed: usize, key_count: Option<i32>) -> Option<usize> {
    key_count.and_then(|c| usize::try_from(c).ok()).filter(|count| listed < *count)
}

/// Full-jitter exponential backoff for retry number `n` (1 for the first retry).
fn jittered_backoff(policy: &RetryPolicy, n: u32) -> Duration {
    let ceiling = policy.base_backoff.saturating_mul(1u32 << n.min(16)).min(policy.max_backoff);
    let random = RandomState::new().hash_one(Instant::now());
    ceiling.mul_f64((random % 1000) as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// However the body arrives, it is handed on in whole pieces of their own, in order.
        #[test]
        fn a_body_is_cut_into_pieces(len in 1usize..5000, piece in 1u64..1500, cuts in proptest::collection::vec(0usize..5000, 0..12), own: bool) {
            let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % len).chain([0, len]).collect();
            cuts.sort_unstable();
            let handed = std::sync::Mutex::new(Vec::new());
            let sink = |number, bytes| handed.lock().unwrap().push((number, bytes));
            let mut pieces = Pieces::new(len as u64, piece, &sink, own);
            for pair in cuts.windows(2) {
                proptest::prop_assert!(pieces.push(Bytes::copy_from_slice(&body[pair[0]..pair[1]])));
            }
            proptest::prop_assert!(!pieces.push(Bytes::from_static(b"x")), "one byte too many");
            proptest::prop_assert_eq!(pieces.received, len as u64);
            let handed = handed.into_inner().unwrap();
            proptest::prop_assert!(handed.iter().enumerate().all(|(i, (number, _))| i == *number));
            proptest::prop_assert_eq!(handed.len(), len.div_ceil(piece as usize));
            proptest::prop_assert!(handed.iter().rev().skip(1).all(|(_, p)| p.len() == piece as usize));
            proptest::prop_assert_eq!(handed.into_iter().flat_map(|(_, p)| p).collect::<Vec<u8>>(), body);
        }
    }

    /// A chunk that is exactly the next piece (the receive path in `http` reads them so) is
    /// handed on as it is; after a chunk that was not, the pieces line up again.
    #[test]
    fn a_chunk_that_is_exactly_the_next_piece_is_handed_on_without_a_copy() {
        let own = |n| Bytes::from(vec![7u8; n]);
        // The fourth: a piece-long slice of a larger buffer someone else holds (as hyper's are).
        let shared = own(1500);
        let chunks = [own(300), own(700), own(1000), shared.slice(..1000), own(500)];
        let pointers: Vec<_> = chunks.iter().map(|c| c.as_ptr()).collect();
        let handed = std::sync::Mutex::new(Vec::new());
        let sink = |_, bytes: Bytes| handed.lock().unwrap().push(bytes);
        let mut pieces = Pieces::new(3500, 1000, &sink, true);
        for chunk in chunks {
            assert!(pieces.push(chunk));
        }
        let handed = handed.into_inner().unwrap();
        assert_eq!(handed.iter().map(Bytes::len).collect::<Vec<_>>(), [1000, 1000, 1000, 500]);
        assert_ne!(handed[0].as_ptr(), pointers[0], "two chunks made the first piece: copied");
        assert_eq!(handed[1].as_ptr(), pointers[2], "not copied");
        assert_ne!(handed[2].as_ptr(), pointers[3], "a slice of a shared buffer is copied");
        assert_eq!(handed[3].as_ptr(), pointers[4], "not copied");
    }

    #[test]
    fn content_range_must_match_exactly() {
        assert!(content_range_matches("bytes 0-99/1000", &(0..100)));
        assert!(content_range_matches("bytes 900-999/1000", &(900..1000)));
        assert!(!content_range_matches("bytes 0-99/1000", &(0..50)));
        assert!(!content_range_matches("bytes 1-100/1000", &(0..100)));
        assert!(!content_range_matches("garbage", &(0..100)));
    }

    #[test]
    fn size_and_mtime_answers_are_checked_against_the_listing() {
        assert_eq!(content_range_total("bytes 0-99/1000"), Some(1000));
        assert_eq!(content_range_total("bytes 0-99/*"), None);
        assert_eq!(content_range_total("garbage"), None);
        let listed = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_500);
        let header = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        assert!(!newer_than_listed(header(1_700_000_000), listed), "same second, fraction dropped");
        assert!(newer_than_listed(header(1_700_000_001), listed));
        assert!(!newer_than_listed(header(1_700_000_001), SystemTime::UNIX_EPOCH));
        let synthesized = ObjectMeta {
            key: "k".into(),
            size: 1000,
            etag: ObjectMeta::synthesized_version(1000, listed),
            mtime: listed,
        };
        assert_eq!(synthesized.etag, "synth:1000-1700000000500000000");
        assert_eq!(synthesized.server_etag(), None, "never sent as If-Match");
        assert_eq!(ObjectMeta { etag: "\"e\"".into(), ..synthesized.clone() }.server_etag(), Some("\"e\""));
        assert_eq!(ObjectMeta { etag: String::new(), ..synthesized }.server_etag(), None);
    }

    #[test]
    fn every_request_kind_shares_one_classification() {
        use Failure::*;
        // Retried: throttling, server errors, bodies cut short or unparsable under a 2xx.
        for (kind, status, code) in [
            (Service, Some(503), Some("SlowDown")),
            (Service, Some(500), Some("InternalError")),
            (Service, Some(429), None),
            (Service, Some(408), None),
            (Response, Some(502), None),
            (Response, Some(200), None),
            (Response, Some(206), None),
            (Service, Some(200), None),
            (Response, None, None),
        ] {
            assert_eq!(class_of(kind, status, code), Class::Retry, "{kind:?} {status:?} {code:?}");
        }
        assert_eq!(class_of(NoAnswer, None, None), Class::NoConnection);
        // Final: gone, replaced, refused, a bad bucket, other client errors.
        assert_eq!(class_of(Service, Some(404), Some("NoSuchKey")), Class::NotFound);
        assert_eq!(class_of(Response, Some(404), None), Class::NotFound);
        assert_eq!(class_of(Service, Some(404), Some("NoSuchBucket")), Class::NoSuchBucket);
        assert_eq!(class_of(Service, Some(412), Some("PreconditionFailed")), Class::Changed);
        assert_eq!(class_of(Service, Some(416), Some("InvalidRange")), Class::Changed);
        assert_eq!(class_of(Service, Some(403), Some("AccessDenied")), Class::Denied);
        assert_eq!(class_of(Service, Some(401), None), Class::Denied);
        assert_eq!(class_of(Service, Some(400), Some("InvalidArgument")), Class::Invalid);
        assert_eq!(class_of(Construction, None, None), Class::Invalid);
        assert_eq!(class_of(NoCredentials, None, None), Class::Invalid);
    }

    #[test]
    fn no_credentials_to_sign_with_is_final_and_says_so_but_no_connection_is_retried() {
        use aws_smithy_runtime_api::client::result::ConnectorError;
        type Error = SdkError<aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Error, HttpResponse>;
        let unsigned: Error = SdkError::dispatch_failure(ConnectorError::other(
            Box::new(CredentialsError::not_loaded("IMDS is disabled")),
            None,
        ));
        match classify("bucket", "", unsigned) {
            AttemptError::Final(StoreError::Failed(message)) => {
                assert!(message.starts_with("no AWS credentials to sign requests with (--sign-requests)"), "{message}")
            }
            _ => panic!("a request that cannot be signed must fail at once, as such"),
        }
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let unreachable: Error = SdkError::dispatch_failure(ConnectorError::io(Box::new(refused)));
        assert!(matches!(classify("bucket", "", unreachable), AttemptError::NoConnection(_)));
    }

    #[test]
    fn a_listing_page_must_hold_what_it_announces() {
        assert_eq!(missing_entries(1000, Some(1000)), None);
        assert_eq!(missing_entries(3, Some(7)), Some(7), "cut short");
        assert_eq!(missing_entries(0, None), None, "a server that does not say");
        assert_eq!(missing_entries(5, Some(3)), None, "a server counting objects only");
    }

    #[test]
    fn backoff_stays_under_cap() {
        let policy = RetryPolicy::default();
        for n in 1..20 {
            assert!(jittered_backoff(&policy, n) <= policy.max_backoff);
        }
    }
}
