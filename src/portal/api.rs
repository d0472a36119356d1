//! The portal's GraphQL API, spoken politely: a few fixed queries (values passed as GraphQL
//! variables, bodies built with serde_json), lists paged with `limitOffset`, at most
//! [`MAX_IN_FLIGHT`] requests at a time, transient failures retried with backoff, and every call
//! bounded by one timeout so a slow or absent API costs a lookup seconds, never a hang. After a
//! call finds the API down (no answer in time, no connection, or a 5xx or 429 answer to every
//! retry), calls fail at once for [`REST`], so a dead, overloaded or throttling API costs one
//! call's attempts, not one per lookup. Behind an HTTP
//! proxy named in the environment (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, minus `NO_PROXY`),
//! as the S3 client is, calls go through it: a CONNECT tunnel to an https API, absolute-form
//! requests to an http one.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderValue;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::ids::{folder_of, key_of_url, Kind};

/// The portal's GraphQL endpoint.
pub const DEFAULT_URL: &str = "https://graphql.cryoetdataportal.czscience.com/graphql";

/// Requests to the API in flight at once, per mount.
pub const MAX_IN_FLIGHT: usize = 4;
/// Rows per page of a list query.
const PAGE: usize = 1000;
/// Tries per request (the first and the retries).
const ATTEMPTS: u32 = 4;
/// Delay before the first retry; doubled for each further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// How long the API is left alone after it was found down.
pub const REST: Duration = Duration::from_secs(30);

/// Why the API gave no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// No answer (retries included) within the timeout.
    #[error("the portal API did not answer within {0:?}")]
    Timeout(Duration),
    /// Another mount sharing the cache directory asked for the same answer moments ago and got
    /// none.
    #[error("the portal API gave no answer to another mount sharing the cache directory")]
    FailedElsewhere,
    /// The API was found down moments ago and is left alone for a while.
    #[error("the portal API was found down; not asked again for {0:?}")]
    Resting(Duration),
    /// The connection failed.
    #[error("the portal API is unreachable: {0}")]
    Unreachable(String),
    /// An HTTP error status.
    #[error("the portal API answered HTTP {0}")]
    Status(u16),
    /// A GraphQL error (the query does not fit the schema, or the server failed).
    #[error("the portal API refused the query: {0}")]
    Rejected(String),
    /// Something that is not a GraphQL answer.
    #[error("the portal API answered something unexpected: {0}")]
    Garbled(String),
}

impl ApiError {
    fn transient(&self) -> bool {
        match self {
            ApiError::Unreachable(_) => true,
            ApiError::Status(status) => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<ApiConnector>, Full<Bytes>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How connections to the API are made: straight, or through the HTTP proxy the environment
/// names for its URL.
#[derive(Clone)]
enum ApiConnector {
    Direct(HttpConnector),
    /// To an https API: a CONNECT tunnel through the proxy (TLS then runs inside it).
    Tunnel(Tunnel<HttpConnector>),
    /// To an http API: a connection to the proxy, which takes requests in absolute form.
    Forward {
        proxy: hyper::Uri,
        http: HttpConnector,
    },
}

impl ApiConnector {
    /// The connector for `api`, and the `Proxy-Authorization` its requests carry (forwarded
    /// through a proxy with credentials in its URL).
    fn for_api(api: &hyper::Uri) -> (ApiConnector, Option<HeaderValue>) {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let Some(intercept) = Matcher::from_env().intercept(api) else { return (ApiConnector::Direct(http), None) };
        let proxy = intercept.uri().clone();
        if proxy.scheme_str() != Some("http") {
            warn!(%proxy, "the portal API's proxy is not an http:// proxy, which is all cdpfs speaks to: connecting directly");
            return (ApiConnector::Direct(http), None);
        }
        info!(%proxy, "reaching the portal API through the proxy");
        let auth = intercept.basic_auth().cloned();
        if api.scheme_str() == Some("https") {
            let tunnel = match auth {
                Some(auth) => Tunnel::new(proxy, http).with_auth(auth),
                None => Tunnel::new(proxy, http),
            };
            (ApiConnector::Tunnel(tunnel), None)
        } else {
            (ApiConnector::Forward { proxy, http }, auth)
        }
    }
}

impl tower_service::Service<hyper::Uri> for ApiConnector {
    type Response = ApiStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<ApiStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: hyper::Uri) -> Self::Future {
        let stream = |io, forwarded| Ok(ApiStream { io, forwarded });
        match self {
            ApiConnector::Direct(http) => {
                let connecting = http.call(dst);
                Box::pin(async move { stream(connecting.await?, false) })
            }
            ApiConnector::Tunnel(tunnel) => {
                let connecting = tunnel.call(dst);
                Box::pin(async move { stream(connecting.await?, false) })
            }
            ApiConnector::Forward { proxy, http } => {
                let connecting = http.call(proxy.clone());
                Box::pin(async move { stream(connecting.await?, true) })
            }
        }
    }
}

/// A connection to the API (or to the proxy that forwards to it).
struct ApiStream {
    io: TokioIo<tokio::net::TcpStream>,
    /// A connection to a forwarding proxy: requests go in absolute form.
    forwarded: bool,
}

impl Connection for ApiStream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.forwarded)
    }
}

impl hyper::rt::Read for ApiStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for ApiStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A client of one GraphQL endpoint.
pub struct PortalApi {
    url: hyper::Uri,
    client: HttpsClient,
    /// `Proxy-Authorization` of each request (to an http API through a proxy with credentials).
    proxy_authorization: Option<HeaderValue>,
    gate: Semaphore,
    timeout: Duration,
    /// Until when calls fail at once, after the API was found down.
    resting_until: Mutex<Option<Instant>>,
}

/// A run that holds an annotation of some object: its id and folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRow {
    /// The run's id (`RN-`).
    pub id: i32,
    /// Its folder's key.
    pub key: String,
}

/// A dataset, its organism and sample type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetRow {
    /// The dataset's id (`DS-`).
    pub id: i32,
    /// Its organism's name, if it has one.
    pub organism: Option<String>,
    /// Its sample type (`organism`, `cell`, `tissue`, `in_vitro`, ...), if it has one.
    pub sample_type: Option<String>,
    /// Its folder's key.
    pub key: String,
}

impl PortalApi {
    /// A client of the GraphQL endpoint at `url` (http or https) whose calls give up after
    /// `timeout`, retries included.
    pub fn new(url: &str, timeout: Duration) -> anyhow::Result<PortalApi> {
        let uri: hyper::Uri = url.parse().map_err(|e| anyhow::anyhow!("invalid --api-url {url:?}: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            anyhow::bail!("invalid --api-url {url:?}: expected an http:// or https:// URL");
        }
        let (connector, proxy_authorization) = ApiConnector::for_api(&uri);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| anyhow::anyhow!("loading the system's TLS roots: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        Ok(PortalApi {
            url: uri,
            client,
            proxy_authorization,
            gate: Semaphore::new(MAX_IN_FLIGHT),
            timeout,
            resting_until: Mutex::default(),
        })
    }

    /// The `data` of one query, retried while the failure is transient, all within the timeout.
    async fn query(&self, query: &str, variables: Value) -> Result<Value, ApiError> {
        if self.resting_until.lock().expect("rest state poisoned").is_some_and(|until| Instant::now() < until) {
            return Err(ApiError::Resting(REST));
        }
        let body = Bytes::from(serde_json::to_vec(&json!({ "query": query, "variables": variables })).expect("JSON"));
        let attempts = async {
            let _permit = self.gate.acquire().await.expect("the gate is never closed");
            let mut backoff = FIRST_BACKOFF;
            for attempt in 1.. {
                match self.post(body.clone()).await {
                    Err(e) if e.transient() && attempt < ATTEMPTS => {
                        debug!(attempt, error = %e, "portal API request failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                    result => return result,
                }
            }
            unreachable!("the loop returns")
        };
        let timed_out = Err(ApiError::Timeout(self.timeout));
        let result = tokio::time::timeout(self.timeout, attempts).await.unwrap_or(timed_out);
        // No answer, or one that still says "not now" once the retries are spent (a 5xx: down,
        // overloaded, a gateway that cannot reach it; a 429: asking to be left alone).
        if let Err(e) = &result {
            if matches!(e, ApiError::Timeout(_)) || e.transient() {
                let url = &self.url;
                warn!(%url, error = %e, rest = ?REST, "the portal API is down; id and facet lookups fail at once");
                *self.resting_until.lock().expect("rest state poisoned") = Some(Instant::now() + REST);
            }
        }
        result
    }

    async fn post(&self, body: Bytes) -> Result<Value, ApiError> {
        let mut request = hyper::Request::post(self.url.clone());
        if let Some(authorization) = &self.proxy_authorization {
            request = request.header(hyper::header::PROXY_AUTHORIZATION, authorization);
        }
        let request = request
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, concat!("cdpfs/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(body))
            .map_err(|e| ApiError::Garbled(e.to_string()))?;
        let response = self.client.request(request).await.map_err(|e| ApiError::Unreachable(e.to_string()))?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| ApiError::Unreachable(e.to_string()))?;
        let answer: Value = match serde_json::from_slice(&bytes.to_bytes()) {
            Ok(answer) => answer,
            Err(_) if !status.is_success() => return Err(ApiError::Status(status.as_u16())),
            Err(e) => return Err(ApiError::Garbled(e.to_string())),
        };
        if let Some(errors) = answer.get("errors").and_then(Value::as_array).filter(|e| !e.is_empty()) {
            let messages: Vec<&str> = errors.iter().filter_map(|e| e.get("message")?.as_str()).collect();
            return Err(ApiError::Rejected(messages.join("; ")));
        }
        if !status.is_success() {
            return Err(ApiError::Status(status.as_u16()));
        }
        answer.get("data").filter(|d| d.is_object()).cloned().ok_or_else(|| ApiError::Garbled("no data".into()))
    }

    /// The rows of root field `field`, page by page (`$limit`/`$offset` of `query`).
    async fn rows(&self, query: &str, field: &str, mut variables: Value) -> Result<Vec<Value>, ApiError> {
        let mut all = Vec::new();
        loop {
            variables["limit"] = json!(PAGE);
            variables["offset"] = json!(all.len());
            let page = self.query(query, variables.clone()).await?;
            let rows = list(&page, field)?;
            let done = rows.len() < PAGE;
            all.extend(rows);
            if done {
                return Ok(all);
            }
        }
    }

    /// The keys ids of one kind (run, tomogram, tilt series, annotation, alignment) stand for
    /// (a folder's ends in `/`), in one request (`_in`); an id the portal does not know is
    /// missing from the answer.
    pub async fn locate(&self, kind: Kind, ids: &[i32]) -> Result<HashMap<i32, String>, ApiError> {
        let Some((field, paths)) = fields_of(kind) else { return Ok(HashMap::new()) };
        let paths = paths.join(" ");
        // Fixed names only: the ids go as a variable.
        let query =
            format!("query {field}ById($ids: [Int!]!) {{ {field}(where: {{id: {{_in: $ids}}}}) {{ id {paths} }} }}");
        let data = self.query(&query, json!({ "ids": ids })).await?;
        let mut found = HashMap::new();
        for row in list(&data, field)? {
            let Some(id) = id_of(&row) else { continue };
            let Some(key) = paths.split(' ').find_map(|p| row.get(p).and_then(Value::as_str).and_then(key_of_url))
            else {
                continue;
            };
            // Annotations and alignments are named by their metadata file: link to its folder.
            let key = match kind {
                Kind::Annotation | Kind::Alignment => folder_of(&key),
                _ => Some(key),
            };
            found.extend(key.map(|key| (id, key)));
        }
        Ok(found)
    }

    /// The reverse of [`PortalApi::locate`]: the ids of the objects of one kind whose key field
    /// `path` (one of [`fields_of`]'s, e.g. `s3MrcFile`) is one of `urls` (`s3://...`), in one
    /// request (`_in`); a URL no object has is missing from the answer.
    pub async fn identify(&self, kind: Kind, path: &str, urls: &[String]) -> Result<HashMap<String, i32>, ApiError> {
        let Some((field, _)) = fields_of(kind).filter(|(_, paths)| paths.contains(&path)) else {
            return Ok(HashMap::new());
        };
        // Fixed names only (the field is one of ours): the URLs go as a variable.
        let query = format!(
            "query {field}ByKey($urls: [String!]!) {{ {field}(where: {{{path}: {{_in: $urls}}}}) {{ id {path} }} }}"
        );
        let data = self.query(&query, json!({ "urls": urls })).await?;
        let rows = list(&data, field)?;
        Ok(rows.iter().filter_map(|row| Some((row.get(path)?.as_str()?.to_owned(), id_of(row)?))).collect())
    }

    /// Every dataset with its organism and sample type, in one paged list.
    pub async fn datasets(&self) -> Result<Vec<DatasetRow>, ApiError> {
        const QUERY: &str = "query Datasets($limit: Int!, $offset: Int!) { datasets(orderBy: [{id: asc}], \
                             limitOffset: {limit: $limit, offset: $offset}) { id organismName sampleType s3Prefix } }";
        let rows = self.rows(QUERY, "datasets", json!({})).await?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                Some(DatasetRow {
                    id: id_of(row)?,
                    organism: row.get("organismName").and_then(Value::as_str).map(str::to_owned),
                    sample_type: row.get("sampleType").and_then(Value::as_str).map(str::to_owned),
                    key: key_of_url(row.get("s3Prefix")?.as_str()?)?,
                })
            })
            .collect())
    }

    /// The names of the objects annotated anywhere in the portal (one aggregate query).
    pub async fn annotated_objects(&self) -> Result<Vec<String>, ApiError> {
        const QUERY: &str =
            "query AnnotatedObjects { annotationsAggregate { aggregate { count groupBy { objectName } } } }";
        let data = self.query(QUERY, json!({})).await?;
        let groups = data
            .pointer("/annotationsAggregate/aggregate")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::Garbled("no annotationsAggregate".into()))?;
        let mut names: Vec<String> = groups
            .iter()
            .filter_map(|g| g.pointer("/groupBy/objectName").and_then(Value::as_str).map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// The runs holding an annotation of object `name`, in one paged list.
    pub async fn runs_with_object(&self, name: &str) -> Result<Vec<RunRow>, ApiError> {
        const QUERY: &str = "query RunsWithObject($name: String!, $limit: Int!, $offset: Int!) { runs(where: \
                             {annotations: {objectName: {_eq: $name}}}, orderBy: [{id: asc}], limitOffset: \
                             {limit: $limit, offset: $offset}) { id s3Prefix } }";
        let rows = self.rows(QUERY, "runs", json!({ "name": name })).await?;
        Ok(rows
            .iter()
            .filter_map(|row| Some(RunRow { id: id_of(row)?, key: key_of_url(row.get("s3Prefix")?.as_str()?)? }))
            .collect())
    }
}

/// The root field listing objects of `kind`, and the fields holding an object's key in the order
/// they are tried; `None` for the kinds named in the key layout.
pub fn fields_of(kind: Kind) -> Option<(&'static str, &'static [&'static str])> {
    match kind {
        Kind::Run => Some(("runs", &["s3Prefix"])),
        Kind::Tomogram => Some(("tomograms", &["s3MrcFile", "s3OmezarrDir"])),
        Kind::TiltSeries => Some(("tiltseries", &["s3MrcFile", "s3OmezarrDir"])),
        Kind::Annotation => Some(("annotations", &["s3MetadataPath"])),
        Kind::Alignment => Some(("alignments", &["s3AlignmentMetadata"])),
        Kind::Dataset | Kind::Deposition => None,
    }
}

fn list(data: &Value, field: &str) -> Result<Vec<Value>, ApiError> {
    data.get(field).and_then(Value::as_array).cloned().ok_or_else(|| ApiError::Garbled(format!("no list {field}")))
}

fn id_of(row: &Value) -> Option<i32> {
    row.get("id")?.as_i64()?.try_into().ok()
}
