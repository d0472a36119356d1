//! The HTTP client under the S3 SDK, with a receive path of cdpfs's own for data GETs.
//!
//! A request that names the size of the pieces its caller keeps the body in ([`PieceSize`]:
//! [`super::s3::S3Store`] sets it on every ranged GET) is sent over this module's own HTTP/1.1
//! connections, and its body is read from the socket straight into buffers of exactly one
//! piece each, aligned with the start of the body. The data path keeps those buffers as its
//! cached blocks, so a block's bytes are copied once on their way from the socket to the
//! cache, not twice (into hyper's read buffer, then out of it). Everything else (listings, an
//! answer whose body is not framed by a Content-Length, every request when an HTTP proxy is
//! configured) goes through the SDK's own client. Requests reach this module built and signed
//! by the SDK, and their answers go back to it to be checked and parsed, so signing, endpoint
//! resolution and error parsing stay the SDK's.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector as TcpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

/// The size of the pieces the caller of a GET keeps its body in: a request extension that
/// sends the GET over [`PieceClient`]'s own receive path.
#[derive(Clone, Copy, Debug)]
pub struct PieceSize(pub u64);

/// One connection to the endpoint, plain or TLS.
type Connection = TokioIo<MaybeHttpsStream<TokioIo<TcpStream>>>;

/// Idle connections kept for reuse, at most.
const MAX_IDLE: usize = 64;
/// How long an idle connection is kept (servers close theirs after a while; S3 after ~20 s).
const IDLE_FOR: Duration = Duration::from_secs(15);
/// The largest response head accepted.
const MAX_HEAD: usize = 64 << 10;

/// The SDK's HTTP client, with [`PieceSize`] GETs taken over (see the module comment).
#[derive(Debug)]
pub struct PieceClient {
    sdk: SharedHttpClient,
    direct: Option<Arc<Direct>>,
}

impl PieceClient {
    /// Wraps the SDK's client `sdk`. `connect_timeout` bounds opening a connection (TLS
    /// included); a body that is slow to fill a piece hands over what it has every half
    /// `stall_timeout`, so the caller's stall watch sees it moving.
    pub fn new(sdk: SharedHttpClient, connect_timeout: Duration, stall_timeout: Duration) -> PieceClient {
        let direct = match Direct::new(connect_timeout, stall_timeout) {
            _ if proxy_configured() => {
                info!("an HTTP proxy is configured: data GETs go through the AWS SDK's client (and the proxy)");
                None
            }
            Ok(direct) => Some(Arc::new(direct)),
            Err(e) => {
                warn!("cannot load the system's TLS roots ({e}): data GETs go through the AWS SDK's client");
                None
            }
        };
        PieceClient { sdk, direct }
    }
}

impl HttpClient for PieceClient {
    fn http_connector(&self, settings: &HttpConnectorSettings, components: &RuntimeComponents) -> SharedHttpConnector {
        let sdk = self.sdk.http_connector(settings, components);
        match &self.direct {
            Some(direct) => SharedHttpConnector::new(PieceConnector { sdk, direct: direct.clone() }),
            None => sdk,
        }
    }
}

#[derive(Debug)]
struct PieceConnector {
    sdk: SharedHttpConnector,
    direct: Arc<Direct>,
}

impl HttpConnector for PieceConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        match request.extension::<PieceSize>() {
            Some(&PieceSize(piece)) if !self.direct.unframed.load(Ordering::Relaxed) => {
                let (sdk, direct) = (self.sdk.clone(), self.direct.clone());
                HttpConnectorFuture::new(async move { direct.get(request, piece, sdk).await })
            }
            _ => self.sdk.call(request),
        }
    }
}

/// The receive path's connections and settings.
struct Direct {
    connector: HttpsConnector<TcpConnector>,
    connect_timeout: Duration,
    stall_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
    /// The endpoint answered a data GET with a body not framed by a Content-Length: from then
    /// on the SDK's client (which reads every framing) takes them all.
    unframed: AtomicBool,
}

struct Idle {
    origin: String,
    connection: Connection,
    since: Instant,
}

impl fmt::Debug for Direct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Direct").field("unframed", &self.unframed).finish_non_exhaustive()
    }
}

/// The parts of a response head the receive path needs.
struct Head {
    response: http::response::Builder,
    status: u16,
    content_length: Option<u64>,
    chunked: bool,
    keep_alive: bool,
    /// Bytes read past the head: the body's start.
    rest: BytesMut,
}

/// Why an exchange failed, and whether any of the answer had arrived.
struct Failed {
    error: io::Error,
    answered: bool,
}

impl Direct {
    fn new(connect_timeout: Duration, stall_timeout: Duration) -> io::Result<Direct> {
        let mut tcp = TcpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()?
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        Ok(Direct {
            connector,
            connect_timeout,
            stall_timeout,
            idle: Mutex::default(),
            unframed: AtomicBool::new(false),
        })
    }

    /// Sends `request` and answers with its head and a body read in pieces of `piece` bytes;
    /// an answer this path cannot frame is asked for again through `sdk`.
    async fn get(
        self: Arc<Self>,
        request: HttpRequest,
        piece: u64,
        sdk: SharedHttpConnector,
    ) -> Result<HttpResponse, ConnectorError> {
        let uri: http::Uri = request.uri().parse().map_err(|e| ConnectorError::user(Box::new(e)))?;
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err(ConnectorError::user(format!("not an absolute URL: {uri}").into()));
        };
        let origin = format!("{scheme}://{authority}");
        let head = request_head(&request, &uri);
        let (connection, head) = loop {
            let (mut connection, reused) = match self.take_idle(&origin) {
                Some(connection) => (connection, true),
                None => (self.connect(&uri).await?, false),
            };
            match exchange(&mut connection, &head).await {
                Ok(answer) => break (connection, answer),
                // A kept connection the server had closed meanwhile: open a new one.
                Err(Failed { answered: false, .. }) if reused => continue,
                Err(failed) => return Err(ConnectorError::io(Box::new(failed.error))),
            }
        };
        let no_body = matches!(head.status, 100..=199 | 204 | 304);
        let length = if no_body { Some(0) } else { head.content_length.filter(|_| !head.chunked) };
        let Some(length) = length else {
            if (200..300).contains(&head.status) && !self.unframed.swap(true, Ordering::Relaxed) {
                info!(%origin, "the endpoint sends data without a Content-Length: data GETs go through the AWS SDK's client");
            }
            return sdk.call(request).await;
        };
        // Bytes past the body's end mean the connection is out of step: not kept.
        let keep_alive = head.keep_alive && head.rest.len() as u64 <= length;
        let mut rest = head.rest;
        rest.truncate(length.min(rest.len() as u64) as usize);
        let body = PieceBody {
            connection: Some(connection),
            give_back: keep_alive.then(|| (self.clone(), origin)),
            left: length - rest.len() as u64,
            rest: rest.freeze(),
            piece: piece.max(1),
            piece_left: 0,
            filling: BytesMut::new(),
            late: None,
            stall_timeout: self.stall_timeout,
        };
        let response =
            head.response.body(SdkBody::from_body_1_x(body)).map_err(|e| ConnectorError::other(e.into(), None))?;
        HttpResponse::try_from(response).map_err(|e| ConnectorError::other(e.into(), None))
    }

    /// A new connection to `uri`'s endpoint (TLS set up for https), within the connect timeout.
    async fn connect(&self, uri: &http::Uri) -> Result<Connection, ConnectorError> {
        let mut connector = self.connector.clone();
        let connecting = tower_service::Service::call(&mut connector, uri.clone());
        match tokio::time::timeout(self.connect_timeout * 2, connecting).await {
            Ok(Ok(stream)) => Ok(TokioIo::new(stream)),
            Ok(Err(e)) => Err(ConnectorError::io(e).never_connected()),
            Err(_) => Err(ConnectorError::timeout(
                format!("no connection to {uri} within {:?}", self.connect_timeout * 2).into(),
            )
            .never_connected()),
        }
    }

    /// The most recently used idle connection to `origin` (dropping those idle too long).
    fn take_idle(&self, origin: &str) -> Option<Connection> {
        let mut idle = self.idle.lock().expect("idle connections poisoned");
        idle.retain(|kept| kept.since.elapsed() < IDLE_FOR);
        let at = idle.iter().rposition(|kept| kept.origin == origin)?;
        Some(idle.remove(at).connection)
    }

    fn give_back(&self, origin: String, connection: Connection) {
        let mut idle = self.idle.lock().expect("idle connections poisoned");
        if idle.len() < MAX_IDLE {
            idle.push(Idle { origin, connection, since: Instant::now() });
        }
    }
}

/// The request's head as HTTP/1.1 text: its method, path and headers, and a Host header.
fn request_head(request: &HttpRequest, uri: &http::Uri) -> Vec<u8> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut head = format!("{} {path} HTTP/1.1\r\n", request.method());
    if !request.headers().contains_key("host") {
        head += &format!("host: {}\r\n", uri.authority().map_or("", |a| a.as_str()));
    }
    for (name, value) in request.headers() {
        head += &format!("{name}: {value}\r\n");
    }
    head += "\r\n";
    head.into_bytes()
}

/// Writes the request head and reads the response head.
async fn exchange(connection: &mut Connection, request: &[u8]) -> Result<Head, Failed> {
    let unanswered = |error| Failed { error, answered: false };
    connection.write_all(request).await.map_err(unanswered)?;
    connection.flush().await.map_err(unanswered)?;
    let mut read = BytesMut::with_capacity(16 << 10);
    loop {
        let answered = !read.is_empty();
        let failed = |error| Failed { error, answered };
        if read.len() >= MAX_HEAD {
            return Err(failed(io::Error::new(io::ErrorKind::InvalidData, "response head too long")));
        }
        if read.capacity() == read.len() {
            read.reserve(16 << 10);
        }
        if connection.read_buf(&mut read).await.map_err(failed)? == 0 {
            return Err(failed(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the answer")));
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        let end = match parsed.parse(&read) {
            Ok(httparse::Status::Complete(end)) => end,
            Ok(httparse::Status::Partial) => continue,
            Err(e) => {
                return Err(failed(io::Error::new(io::ErrorKind::InvalidData, format!("bad response head: {e}"))))
            }
        };
        let status = parsed.code.unwrap_or(0);
        let mut head = Head {
            response: http::Response::builder().status(status),
            status,
            content_length: None,
            chunked: false,
            keep_alive: parsed.version == Some(1),
            rest: BytesMut::new(),
        };
        for header in parsed.headers.iter() {
            let value = String::from_utf8_lossy(header.value);
            if header.name.eq_ignore_ascii_case("content-length") {
                head.content_length = value.trim().parse().ok();
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                head.chunked = true;
            } else if header.name.eq_ignore_ascii_case("connection") {
                head.keep_alive &= !value.to_ascii_lowercase().contains("close");
            }
            head.response = head.response.header(header.name, header.value);
        }
        head.rest = read.split_off(end);
        return Ok(head);
    }
}

/// A response body read from its connection in buffers of one piece each (see the module
/// comment); a piece slow to fill is handed over in parts, every half stall timeout.
struct PieceBody {
    connection: Option<Connection>,
    /// Where the connection goes when the whole body was read.
    give_back: Option<(Arc<Direct>, String)>,
    /// Body bytes that came with the head.
    rest: Bytes,
    /// Body bytes not yet in a buffer.
    left: u64,
    piece: u64,
    /// Bytes until the end of the piece being filled.
    piece_left: usize,
    filling: BytesMut,
    late: Option<Pin<Box<tokio::time::Sleep>>>,
    stall_timeout: Duration,
}

impl PieceBody {
    /// Hands over what the buffer holds: all of its piece, as a buffer of its own, or part of
    /// it when late (the rest of the piece then fills the rest of the buffer).
    fn hand_over(&mut self) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.piece_left -= self.filling.len();
        self.late = None;
        let handed = if self.piece_left == 0 { std::mem::take(&mut self.filling) } else { self.filling.split() };
        Poll::Ready(Some(Ok(Frame::data(handed.freeze()))))
    }
}

impl http_body::Body for PieceBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if this.piece_left == 0 {
                // (The last piece was handed over whole: nothing is being filled.)
                let body_left = this.left + this.rest.len() as u64;
                if body_left == 0 {
                    if let (Some((direct, origin)), Some(connection)) = (this.give_back.take(), this.connection.take())
                    {
                        direct.give_back(origin, connection);
                    }
                    return Poll::Ready(None);
                }
                this.piece_left = this.piece.min(body_left) as usize;
                this.filling = BytesMut::with_capacity(this.piece_left);
            }
            if !this.rest.is_empty() {
                let take = this.rest.len().min(this.piece_left - this.filling.len());
                this.filling.extend_from_slice(&this.rest.split_to(take));
            } else {
                let Some(connection) = this.connection.as_mut() else { return Poll::Ready(None) };
                let want = this.piece_left - this.filling.len();
                let mut space = (&mut this.filling).limit(want);
                match tokio_util::io::poll_read_buf(Pin::new(connection), cx, &mut space) {
                    Poll::Ready(Ok(0)) => {
                        let cut = format!("the connection closed {} bytes before the body's end", this.left);
                        return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::UnexpectedEof, cut))));
                    }
                    Poll::Ready(Ok(n)) => this.left -= n as u64,
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                    Poll::Pending if this.filling.is_empty() => return Poll::Pending,
                    Poll::Pending => {
                        let half_stall = this.stall_timeout / 2;
                        let late = this.late.get_or_insert_with(|| Box::pin(tokio::time::sleep(half_stall)));
                        return match late.as_mut().poll(cx) {
                            Poll::Ready(()) => this.hand_over(),
                            Poll::Pending => Poll::Pending,
                        };
                    }
                }
            }
            if this.filling.len() == this.piece_left {
                return this.hand_over();
            }
        }
    }
}

/// Whether an HTTP proxy is set in the environment (the SDK's client honours it; this
/// module's connections would not).
fn proxy_configured() -> bool {
    ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()))
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;
    use tokio::net::TcpListener;

    use super::*;

    /// One scripted answer: what the server writes, in parts, each after a pause.
    struct Answer {
        writes: Vec<(Duration, Vec<u8>)>,
        /// Close the connection afterwards (without saying so in the head).
        close: bool,
    }

    /// A loopback HTTP/1.1 server that reads each request head and writes the next scripted
    /// answer; counts the connections it accepted.
    async fn serve(answers: Vec<Answer>) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let answers = answers.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    loop {
                        let mut byte = [0u8; 1];
                        if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        request.push(byte[0]);
                        if !request.ends_with(b"\r\n\r\n") {
                            continue;
                        }
                        request.clear();
                        let Some(answer) = answers.lock().unwrap().pop_front() else { return };
                        for (pause, bytes) in answer.writes {
                            tokio::time::sleep(pause).await;
                            if socket.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                        if answer.close {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// A 206 answer for `bytes`, written in parts cut at `cuts` (offsets into the whole answer).
    fn answer(bytes: &[u8], cuts: &[usize], close: bool) -> Answer {
        let mut whole = format!("HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\n\r\n", bytes.len()).into_bytes();
        whole.extend_from_slice(bytes);
        let mut at = 0;
        let mut writes = Vec::new();
        for &cut in cuts.iter().chain([&whole.len()]) {
            writes.push((Duration::from_millis(5), whole[at..cut].to_vec()));
            at = cut;
        }
        Answer { writes, close }
    }

    /// The SDK's client in the tests: answers 200 "from the SDK" and counts its calls.
    #[derive(Clone, Debug, Default)]
    struct SdkStandIn(Arc<AtomicUsize>);

    impl HttpConnector for SdkStandIn {
        fn call(&self, _: HttpRequest) -> HttpConnectorFuture {
            self.0.fetch_add(1, Ordering::SeqCst);
            HttpConnectorFuture::ready(Ok(HttpResponse::new(200.try_into().unwrap(), SdkBody::from("from the SDK"))))
        }
    }

    fn direct(stall_timeout: Duration) -> Arc<Direct> {
        Arc::new(Direct::new(Duration::from_secs(1), stall_timeout).unwrap())
    }

    /// GETs `/key` from `addr` through `direct` in pieces of `piece` bytes: the status and the
    /// body's frames, each with the time it arrived after the request.
    async fn get(
        direct: &Arc<Direct>,
        addr: SocketAddr,
        piece: u64,
        sdk: &SdkStandIn,
    ) -> Result<(u16, Vec<(Duration, Bytes)>), String> {
        let started = Instant::now();
        let request = HttpRequest::get(format!("http://{addr}/bucket/key")).unwrap();
        let response = direct
            .clone()
            .get(request, piece, SharedHttpConnector::new(sdk.clone()))
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            frames.push((started.elapsed(), frame.into_data().unwrap()));
        }
        Ok((status, frames))
    }

    fn lengths(frames: &[(Duration, Bytes)]) -> Vec<usize> {
        frames.iter().map(|(_, bytes)| bytes.len()).collect()
    }

    fn joined(frames: &[(Duration, Bytes)]) -> Vec<u8> {
        frames.iter().flat_map(|(_, bytes)| bytes.iter().copied()).collect()
    }

    #[tokio::test]
    async fn a_body_is_read_in_whole_pieces_however_the_socket_cuts_it_and_the_connection_is_kept() {
        let wanted = body(4500);
        // Cut inside the head, just after it (with body bytes), and at odd places in the body.
        let (addr, accepted) =
            serve(vec![answer(&wanted, &[20, 60, 999, 1001, 2500, 4000], false), answer(&wanted, &[], false)]).await;
        let (direct, sdk) = (direct(Duration::from_secs(5)), SdkStandIn::default());
        for _ in 0..2 {
            let (status, frames) = get(&direct, addr, 1000, &sdk).await.unwrap();
            assert_eq!(status, 206);
            assert_eq!(lengths(&frames), [1000, 1000, 1000, 1000, 500], "one frame per piece, aligned");
            assert!(frames.iter().all(|(_, frame)| frame.is_unique()), "each piece a buffer of its own");
            assert_eq!(joined(&frames), wanted);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "the second GET went over the kept connection");
        assert_eq!(sdk.0.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_kept_connection_the_server_closed_is_replaced_without_an_error() {
        let wanted = body(3000);
        let (addr, accepted) = serve(vec![answer(&wanted, &[], true), answer(&wanted, &[], true)]).await;
        let (direct, sdk) = (direct(Duration::from_secs(5)), SdkStandIn::default());
        for _ in 0..2 {
            let (_, frames) = get(&direct, addr, 1024, &sdk).await.unwrap();
            assert_eq!(joined(&frames), wanted);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_piece_slow_to_fill_is_handed_over_in_parts_within_half_the_stall_timeout() {
        let wanted = body(2000);
        let mut slow = answer(&wanted, &[200], false);
        slow.writes[1].0 = Duration::from_millis(800);
        let (addr, _) = serve(vec![slow]).await;
        let (direct, sdk) = (direct(Duration::from_millis(200)), SdkStandIn::default());
        let (_, frames) = get(&direct, addr, 2000, &sdk).await.unwrap();
        assert!(frames.len() >= 2, "{:?}", lengths(&frames));
        assert!(frames[0].0 < Duration::from_millis(500), "the first part came after {:?}", frames[0].0);
        assert_eq!(joined(&frames), wanted);
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_not_a_short_body() {
        let wanted = body(3000);
        let mut cut = answer(&wanted, &[], true);
        cut.writes[0].1.truncate(2000);
        let (addr, _) = serve(vec![cut]).await;
        let (direct, sdk) = (direct(Duration::from_secs(5)), SdkStandIn::default());
        let error = get(&direct, addr, 1000, &sdk).await.unwrap_err();
        assert!(error.contains("before the body's end"), "{error}");
    }

    #[tokio::test]
    async fn an_answer_without_a_content_length_is_asked_for_again_through_the_sdks_client() {
        let chunked = b"HTTP/1.1 206 Partial Content\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let (addr, _) = serve(vec![Answer { writes: vec![(Duration::ZERO, chunked.to_vec())], close: false }]).await;
        let (direct, sdk) = (direct(Duration::from_secs(5)), SdkStandIn::default());
        let (status, frames) = get(&direct, addr, 1000, &sdk).await.unwrap();
        assert_eq!((status, joined(&frames)), (200, b"from the SDK".to_vec()));
        assert_eq!(sdk.0.load(Ordering::SeqCst), 1);
        assert!(direct.unframed.load(Ordering::SeqCst), "later data GETs go to the SDK's client");
    }
}
