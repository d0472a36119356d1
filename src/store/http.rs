//! The HTTP client under the S3 SDK, with a receive path of cdpfs's own for data GETs.
//!
//! A GET that names the size of the pieces its caller keeps the body in ([`PieceSize`]:
//! [`super::s3::S3Store`] sets it on every ranged GET) is sent over this module's own HTTP/1.1
//! connections, and a body framed by a Content-Length is read from the socket straight into
//! buffers of exactly one piece each, aligned with the start of the body. The data path keeps
//! those buffers as its cached blocks, so a block's bytes are copied once on their way from the
//! socket to the cache, not twice (into hyper's read buffer, then out of it). A chunked or
//! close-delimited body (error answers, some mirrors) is read whole into one buffer. Everything
//! else (listings, every request when the environment sets an HTTP proxy for the endpoint) goes through the SDK's own
//! client. Requests reach this module built and signed by the SDK, and their answers go back
//! to it to be checked and parsed, so signing, endpoint resolution and error parsing stay the
//! SDK's.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
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
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::Frame;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector as TcpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
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
/// The largest response head accepted, and the most headers in it.
const MAX_HEAD: usize = 64 << 10;
const MAX_HEADERS: usize = 256;
/// The most a TLS layer may hold of a record it has not yet decrypted (16 KiB of data and its
/// overhead, rounded up).
const TLS_RECORD_BYTES: usize = 32 << 10;
/// The largest body read whole (an error answer's, or one not framed by a Content-Length): as
/// much as any GET cdpfs sends asks for.
const MAX_WHOLE: usize = 64 << 20;

/// The SDK's HTTP client, with [`PieceSize`] GETs taken over (see the module comment).
#[derive(Debug)]
pub struct PieceClient {
    sdk: SharedHttpClient,
    direct: Option<Arc<Direct>>,
}

impl PieceClient {
    /// The SDK's default client, wrapped. `connect_timeout` bounds opening a connection (TLS
    /// included); `stall_timeout` is the caller's: a piece slow to fill is handed over in parts
    /// so that the caller sees data within half of it whenever some arrived.
    /// Data GETs to `endpoint` take the SDK's client (which speaks to proxies) when the
    /// environment's proxy settings (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`, as
    /// the portal API's client reads them) send the endpoint through a proxy.
    pub fn new(connect_timeout: Duration, stall_timeout: Duration, endpoint: &str) -> PieceClient {
        let sdk = sdk_default_client();
        if proxied(&Matcher::from_env(), endpoint) {
            info!(
                endpoint,
                "an HTTP proxy is set for the S3 endpoint: data GETs go through the AWS SDK's client and the proxy"
            );
            return PieceClient { sdk, direct: None };
        }
        let direct = match Direct::new(connect_timeout, stall_timeout) {
            Ok(direct) => Some(Arc::new(direct)),
            Err(e) => {
                warn!("cannot load the system's TLS roots ({e}): data GETs go through the AWS SDK's client");
                None
            }
        };
        PieceClient { sdk, direct }
    }

    /// Whether data GETs come in buffers of their own, one per piece (else in hyper's chunks,
    /// which share its read buffers and must be copied before they are kept).
    pub fn reads_into_pieces(&self) -> bool {
        self.direct.is_some()
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
        let bodiless_get = request.method() == "GET" && request.body().bytes().is_some_and(<[u8]>::is_empty);
        match request.extension::<PieceSize>() {
            Some(&PieceSize(piece)) if bodiless_get => {
                let direct = self.direct.clone();
                HttpConnectorFuture::new(async move { direct.get(request, piece).await })
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
}

struct Idle {
    origin: String,
    connection: Connection,
    since: Instant,
}

impl fmt::Debug for Direct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Direct").field("stall_timeout", &self.stall_timeout).finish_non_exhaustive()
    }
}

/// How a response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// The parts of a response head the receive path needs.
struct Head {
    response: http::response::Builder,
    framing: Framing,
    keep_alive: bool,
    /// A 2xx status.
    success: bool,
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
        Ok(Direct { connector, connect_timeout, stall_timeout, idle: Mutex::default() })
    }

    /// Sends `request` and answers with its head and its body: read in pieces of `piece`
    /// bytes when framed by a Content-Length, else whole.
    async fn get(self: Arc<Self>, request: HttpRequest, piece: u64) -> Result<HttpResponse, ConnectorError> {
        let uri: http::Uri = request.uri().parse().map_err(|e| ConnectorError::user(Box::new(e)))?;
        let Some((origin, host)) = origin_of(&uri) else {
            return Err(ConnectorError::user(format!("not an absolute URL: {uri}").into()));
        };
        let head = request_head(&request, &uri, &host);
        let (mut connection, head) = loop {
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
        let keep_alive = head.keep_alive;
        let body = match head.framing {
            // A data answer, read in pieces (its length was asked for: `S3Store` checks it
            // before reading the body). Error answers are read whole, within a bound.
            Framing::Length(length) if head.success => {
                // Bytes past the body's end mean the connection is out of step: not kept.
                let in_step = head.rest.len() as u64 <= length;
                let mut rest = head.rest;
                rest.truncate(length.min(rest.len() as u64) as usize);
                SdkBody::from_body_1_x(PieceBody {
                    connection: Some(connection),
                    give_back: (keep_alive && in_step).then(|| (self.clone(), origin)),
                    left: length - rest.len() as u64,
                    rest: rest.freeze(),
                    piece: piece.max(1),
                    piece_left: 0,
                    filling: BytesMut::new(),
                    late: None,
                    stall_timeout: self.stall_timeout,
                    wake_at: 1,
                    trickling: false,
                })
            }
            framing => {
                let mut rest = head.rest;
                match read_whole(&mut connection, &mut rest, framing, self.stall_timeout).await {
                    Ok(whole) => {
                        if keep_alive && framing != Framing::UntilClose && rest.is_empty() {
                            self.give_back(origin, connection);
                        }
                        SdkBody::from(whole)
                    }
                    // The server answered: its status stands, and the body's failure is the
                    // caller's to classify (retried like a cut-short body), not "no answer".
                    Err(e) => SdkBody::from_body_1_x(Failing(Some(e))),
                }
            }
        };
        let response = head.response.body(body).map_err(|e| ConnectorError::other(e.into(), None))?;
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

    /// The most recently used idle connection to `origin` that is still open and quiet
    /// (dropping those idle too long, closed by the server, or with bytes nobody asked for).
    fn take_idle(&self, origin: &str) -> Option<Connection> {
        let mut idle = self.idle.lock().expect("idle connections poisoned");
        idle.retain(|kept| kept.since.elapsed() < IDLE_FOR);
        while let Some(at) = idle.iter().rposition(|kept| kept.origin == origin) {
            let mut connection = idle.remove(at).connection;
            if quiet(&mut connection) {
                return Some(connection);
            }
        }
        None
    }

    fn give_back(&self, origin: String, connection: Connection) {
        let mut idle = self.idle.lock().expect("idle connections poisoned");
        if idle.len() < MAX_IDLE {
            idle.push(Idle { origin, connection, since: Instant::now() });
        }
    }
}

/// The origin (`scheme://host[:port]`) of an absolute URL and its Host header, named as hyper
/// and the SigV4 signature name it: without the scheme's default port.
fn origin_of(uri: &http::Uri) -> Option<(String, String)> {
    let (scheme, host) = (uri.scheme_str()?, uri.host()?);
    let default_port = if scheme == "https" { 443 } else { 80 };
    let host = match uri.port_u16() {
        Some(port) if port != default_port => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    Some((format!("{scheme}://{host}"), host))
}

/// Whether an idle connection has nothing to read: not closed, no bytes, no error.
fn quiet(connection: &mut Connection) -> bool {
    let mut byte = [std::mem::MaybeUninit::uninit(); 1];
    let mut buf = ReadBuf::uninit(&mut byte);
    // Outside tokio's cooperative budget, which would answer Pending without looking.
    let peek = tokio::task::coop::unconstrained(std::future::poll_fn(|cx| {
        Poll::Ready(Pin::new(&mut *connection).poll_read(cx, &mut buf).is_pending())
    }));
    let mut cx = Context::from_waker(std::task::Waker::noop());
    matches!(std::pin::pin!(peek).poll(&mut cx), Poll::Ready(true))
}

/// The request's head as HTTP/1.1 text: its method, path and headers, and a Host header.
fn request_head(request: &HttpRequest, uri: &http::Uri, host: &str) -> Vec<u8> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut head = format!("{} {path} HTTP/1.1\r\n", request.method());
    if !request.headers().contains_key("host") {
        head += &format!("host: {host}\r\n");
    }
    for (name, value) in request.headers() {
        head += &format!("{name}: {value}\r\n");
    }
    head += "\r\n";
    head.into_bytes()
}

/// Writes the request head and reads the response head (past any interim 1xx answer).
async fn exchange(connection: &mut Connection, request: &[u8]) -> Result<Head, Failed> {
    let unanswered = |error| Failed { error, answered: false };
    connection.write_all(request).await.map_err(unanswered)?;
    connection.flush().await.map_err(unanswered)?;
    let mut read = BytesMut::with_capacity(16 << 10);
    let mut answered = false;
    loop {
        let failed = |message: String| Failed { error: io::Error::new(io::ErrorKind::InvalidData, message), answered };
        if !read.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut headers);
            match parsed.parse(&read) {
                Ok(httparse::Status::Complete(end)) => match parsed.code {
                    Some(101) => return Err(failed("the server switched protocols".into())),
                    Some(100..=199) => {
                        read.advance(end);
                        continue;
                    }
                    _ => {
                        let mut head = head_of(&parsed).map_err(failed)?;
                        head.rest = read.split_off(end);
                        return Ok(head);
                    }
                },
                Ok(httparse::Status::Partial) if read.len() >= MAX_HEAD => {
                    return Err(failed("response head too long".into()))
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(failed(format!("bad response head: {e}"))),
            }
        }
        if read.capacity() == read.len() {
            read.reserve(16 << 10);
        }
        match connection.read_buf(&mut read).await {
            Ok(0) => {
                let error = io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the answer");
                return Err(Failed { error, answered });
            }
            Ok(_) => answered = true,
            Err(error) => return Err(Failed { error, answered }),
        }
    }
}

/// The head of a final answer: its status and headers for the SDK, and how its body is framed.
fn head_of(parsed: &httparse::Response<'_, '_>) -> Result<Head, String> {
    let status = parsed.code.unwrap_or(0);
    let mut response = http::Response::builder().status(status);
    let (mut length, mut coded) = (None, None);
    let mut keep_alive = parsed.version == Some(1);
    for header in parsed.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("");
        if header.name.eq_ignore_ascii_case("content-length") {
            let parsed = value.trim().parse::<u64>().ok().filter(|_| value.trim().bytes().all(|b| b.is_ascii_digit()));
            if parsed.is_none() || length.is_some_and(|known| Some(known) != parsed) {
                return Err(format!("invalid Content-Length {value:?}"));
            }
            length = parsed;
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked when that is the last coding; any other ends at the connection's end.
            let last = value.rsplit(',').next().unwrap_or("").trim();
            coded = Some(last.eq_ignore_ascii_case("chunked"));
        } else if header.name.eq_ignore_ascii_case("connection") {
            keep_alive &= !value.split(',').any(|token| token.trim().eq_ignore_ascii_case("close"));
        }
        response = response.header(header.name, header.value);
    }
    let framing = match (status, coded, length) {
        (204 | 304, ..) => Framing::Length(0),
        (_, Some(true), _) => Framing::Chunked,
        (_, Some(false), _) | (_, None, None) => Framing::UntilClose,
        (_, None, Some(length)) => Framing::Length(length),
    };
    keep_alive &= framing != Framing::UntilClose;
    Ok(Head { response, framing, keep_alive, success: (200..300).contains(&status), rest: BytesMut::new() })
}

/// A body read whole: an error answer's, or one framed by chunked transfer coding or by the
/// connection's end (`read` holds what came with the head; what is left in it afterwards came
/// after the body). At most [`MAX_WHOLE`] bytes.
async fn read_whole(
    connection: &mut Connection,
    read: &mut BytesMut,
    framing: Framing,
    stall_timeout: Duration,
) -> io::Result<Bytes> {
    let invalid = |message: &str| io::Error::new(io::ErrorKind::InvalidData, message.to_owned());
    let mut body = Vec::new();
    match framing {
        Framing::Length(length) => {
            let length =
                usize::try_from(length).ok().filter(|&n| n <= MAX_WHOLE).ok_or_else(|| invalid("body too long"))?;
            while read.len() < length {
                if !read_more(connection, read, stall_timeout).await? {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            body.extend_from_slice(&read.split_to(length));
        }
        Framing::UntilClose => loop {
            body.extend_from_slice(&read.split());
            if body.len() > MAX_WHOLE {
                return Err(invalid("body too long"));
            }
            if !read_more(connection, read, stall_timeout).await? {
                break;
            }
        },
        Framing::Chunked => loop {
            let size_line = read_line(connection, read, stall_timeout).await?;
            let size = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| invalid("bad chunk size"))?;
            if size == 0 {
                // Trailers, then an empty line.
                for _ in 0..MAX_HEADERS {
                    if read_line(connection, read, stall_timeout).await?.is_empty() {
                        break;
                    }
                }
                break;
            }
            if size > MAX_WHOLE - body.len() {
                return Err(invalid("body too long"));
            }
            while read.len() < size + 2 {
                if !read_more(connection, read, stall_timeout).await? {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            body.extend_from_slice(&read[..size]);
            if &read[size..size + 2] != b"\r\n" {
                return Err(invalid("chunk not followed by CRLF"));
            }
            read.advance(size + 2);
        },
    }
    body.shrink_to_fit();
    Ok(Bytes::from(body))
}

/// A body that fails with the error that cut it short.
struct Failing(Option<io::Error>);

impl http_body::Body for Failing {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Poll::Ready(self.get_mut().0.take().map(Err))
    }
}

/// Reads more of the answer into `read`; false at the connection's end.
async fn read_more(connection: &mut Connection, read: &mut BytesMut, stall_timeout: Duration) -> io::Result<bool> {
    read.reserve(16 << 10);
    match tokio::time::timeout(stall_timeout, connection.read_buf(read)).await {
        Ok(result) => Ok(result? > 0),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("no data for {stall_timeout:?}"))),
    }
}

/// One CRLF-terminated line of a chunked body (without the CRLF).
async fn read_line(connection: &mut Connection, read: &mut BytesMut, stall_timeout: Duration) -> io::Result<String> {
    loop {
        if let Some(end) = read.windows(2).position(|pair| pair == b"\r\n") {
            let line = String::from_utf8_lossy(&read[..end]).into_owned();
            read.advance(end + 2);
            return Ok(line);
        }
        if read.len() > 4096 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk line too long"));
        }
        if !read_more(connection, read, stall_timeout).await? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// A response body read from its connection in buffers of one piece each (see the module
/// comment). When the caller has waited half the stall timeout for a piece, what has arrived
/// of it is handed over (its rest follows as another part), so the caller sees data move.
struct PieceBody {
    connection: Option<Connection>,
    /// Where the connection goes when the whole body was read.
    give_back: Option<(Arc<Direct>, String)>,
    /// Body bytes that came with the head.
    rest: Bytes,
    /// Body bytes still to come from the connection.
    left: u64,
    piece: u64,
    /// Bytes until the end of the piece being filled.
    piece_left: usize,
    filling: BytesMut,
    /// Half a stall timeout from when the caller began waiting for the next frame.
    late: Option<Pin<Box<tokio::time::Sleep>>>,
    stall_timeout: Duration,
    /// The connection's `SO_RCVLOWAT`: how many bytes it waits for before it wakes the reader.
    wake_at: usize,
    /// A wait for a piece outlasted half the stall timeout: from then on every byte of the body
    /// wakes the reader (bytes trickle in).
    trickling: bool,
}

impl PieceBody {
    /// The whole body was read from the connection: it goes back to the pool if it may.
    fn release(&mut self) {
        let Some((direct, origin)) = self.give_back.take() else { return };
        // One still waiting for more than a byte would hold up the next answer's head.
        self.wake_when(1);
        if let Some(connection) = self.connection.take().filter(|_| self.wake_at == 1) {
            direct.give_back(origin, connection);
        }
    }

    /// Has the connection wake the reader once `bytes` have arrived (or the body ended, or the
    /// kernel's receive window is nearly full), not at every segment the server writes: a
    /// piece waited for comes in a few receives instead of one per 64 KiB (a cold 2.3 GB read
    /// at 80 MB/s per connection: 40% of the receives, a quarter of the epoll waits, two
    /// thirds of the context switches, 8% less CPU per GB).
    fn wake_when(&mut self, bytes: usize) {
        let Some(connection) = &self.connection else { return };
        // Over TLS, part of what is waited for may already be in the TLS layer (a record it
        // has only part of): the socket is to wake for what must still come through it.
        let bytes = match connection.inner() {
            MaybeHttpsStream::Http(_) => bytes,
            MaybeHttpsStream::Https(_) => bytes.saturating_sub(TLS_RECORD_BYTES).max(1),
        };
        if bytes == self.wake_at {
            return;
        }
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int, on a socket
        // this connection owns.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(socket_of(connection)),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // Linux grows the receive buffer to hold `bytes` if it is smaller (kernels before
        // late 2025 also set the window clamp to `bytes` then, which autotuning raises again as
        // data flows). Where it cannot be set, the connection wakes the reader as it did.
        if set == 0 {
            self.wake_at = bytes;
        }
    }

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
        let half_stall = this.stall_timeout / 2;
        this.late.get_or_insert_with(|| Box::pin(tokio::time::sleep(half_stall)));
        loop {
            if this.piece_left == 0 {
                // (The last piece was handed over whole: nothing is being filled.)
                let body_left = this.left + this.rest.len() as u64;
                if body_left == 0 {
                    this.release();
                    return Poll::Ready(None);
                }
                this.piece_left = this.piece.min(body_left) as usize;
                this.filling = piece_buffer(this.piece_left);
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
                    Poll::Ready(Ok(n)) => {
                        this.left -= n as u64;
                        if this.left == 0 {
                            this.release();
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                    Poll::Pending => {
                        let late = this.late.as_mut().expect("set above");
                        if late.as_mut().poll(cx).is_pending() {
                            this.wake_when(if this.trickling { 1 } else { want });
                            return Poll::Pending;
                        }
                        // Late: what came so far goes to the caller, and from now on each byte
                        // wakes it (bytes already in the socket come at the next hand-over).
                        this.trickling = true;
                        this.wake_when(1);
                        return match this.filling.is_empty() {
                            true => Poll::Pending,
                            false => this.hand_over(),
                        };
                    }
                }
            }
            let overdue = this.late.as_ref().is_some_and(|late| late.deadline() <= tokio::time::Instant::now());
            if this.filling.len() == this.piece_left || overdue {
                return this.hand_over();
            }
        }
    }
}

/// The TCP socket under a connection, plain or TLS.
fn socket_of(connection: &Connection) -> &TcpStream {
    match connection.inner() {
        MaybeHttpsStream::Http(tcp) => tcp.inner(),
        MaybeHttpsStream::Https(tls) => tls.inner().get_ref().0.inner().inner(),
    }
}

/// An empty buffer for a piece of `len` bytes. One of whole pages and at least [`ALIGNED_FROM`]
/// (a block) starts on a page boundary, so the disk tier writes the block it becomes straight
/// from it (`O_DIRECT` takes only aligned memory), with no copy into an aligned buffer; the page
/// before it this may cost (under 1% of a block, uncounted by the caches) is given back with it.
fn piece_buffer(len: usize) -> BytesMut {
    const PAGE: usize = 4096;
    /// Smaller pieces (a 4 KiB header read kept whole) are not worth a page more.
    const ALIGNED_FROM: usize = 64 << 10;
    if len < ALIGNED_FROM || !len.is_multiple_of(PAGE) {
        return BytesMut::with_capacity(len);
    }
    let mut buffer = BytesMut::with_capacity(len + PAGE);
    let skip = buffer.as_ptr().align_offset(PAGE);
    buffer.resize(skip, 0);
    drop(buffer.split_to(skip));
    buffer
}

/// The client the SDK builds when given none: hyper with rustls (aws-lc), and the proxies the
/// environment names (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`, ...). Built here because a client
/// of our own replaces it; `aws_smithy_http_client::Builder::build_https` alone sets no proxy.
fn sdk_default_client() -> SharedHttpClient {
    use aws_smithy_http_client::{proxy::ProxyConfig, tls, Builder, ConnectorBuilder};
    Builder::new().build_with_connector_fn(|settings, components| {
        let mut connector =
            ConnectorBuilder::default().tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::AwsLc));
        connector.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            connector.set_sleep_impl(components.sleep_impl());
        }
        connector.set_proxy_config(Some(ProxyConfig::from_env()));
        connector.build()
    })
}

/// Whether `proxies` send requests to `endpoint` through a proxy (an endpoint that is no URI
/// is left to the SDK's client, which reports it).
fn proxied(proxies: &Matcher, endpoint: &str) -> bool {
    endpoint.parse::<http::Uri>().map_or(true, |uri| proxies.intercept(&uri).is_some())
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::net::TcpListener;

    use super::*;

    #[test]
    fn data_gets_take_the_sdk_client_only_when_the_proxy_settings_cover_the_endpoint() {
        let proxy = "http://proxy.site:3128";
        let only_outside = Matcher::builder().all(proxy).no("127.0.0.1, .site.local").build();
        assert!(!proxied(&only_outside, "http://127.0.0.1:9000"), "NO_PROXY covers it");
        assert!(!proxied(&only_outside, "https://s3-mirror.site.local"), "NO_PROXY covers its domain");
        assert!(proxied(&only_outside, "https://cryoet-data-portal-public.s3.us-west-2.amazonaws.com"));
        let https_only = Matcher::builder().https(proxy).build();
        assert!(proxied(&https_only, "https://cryoet-data-portal-public.s3.us-west-2.amazonaws.com"));
        assert!(!proxied(&https_only, "http://10.0.0.5:9000"), "no proxy for http");
        assert!(!proxied(&Matcher::builder().build(), "https://cryoet-data-portal-public.s3.us-west-2.amazonaws.com"));
        assert!(proxied(&Matcher::builder().build(), "not a uri"));
    }

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

    fn direct(stall_timeout: Duration) -> Arc<Direct> {
        Arc::new(Direct::new(Duration::from_secs(1), stall_timeout).unwrap())
    }

    /// GETs `/key` from `addr` through `direct` in pieces of `piece` bytes: the status and the
    /// body's frames, each with the time it arrived after the request.
    async fn get(direct: &Arc<Direct>, addr: SocketAddr, piece: u64) -> Result<(u16, Vec<(Duration, Bytes)>), String> {
        let started = Instant::now();
        let request = HttpRequest::get(format!("http://{addr}/bucket/key")).unwrap();
        let response = direct.clone().get(request, piece).await.map_err(|e| e.to_string())?;
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
        let direct = direct(Duration::from_secs(5));
        for _ in 0..2 {
            let (status, frames) = get(&direct, addr, 1000).await.unwrap();
            assert_eq!(status, 206);
            assert_eq!(lengths(&frames), [1000, 1000, 1000, 1000, 500], "one frame per piece, aligned");
            assert!(frames.iter().all(|(_, frame)| frame.is_unique()), "each piece a buffer of its own");
            assert_eq!(joined(&frames), wanted);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "the second GET went over the kept connection");
    }

    #[tokio::test]
    async fn pieces_of_whole_pages_start_on_a_page_so_the_disk_tier_writes_them_as_they_are() {
        const PIECE: usize = 64 << 10;
        let wanted = body(3 * PIECE + 100);
        let (addr, _) = serve(vec![answer(&wanted, &[20, 5000, 70000, 140000], false)]).await;
        let (_, frames) = get(&direct(Duration::from_secs(5)), addr, PIECE as u64).await.unwrap();
        assert_eq!(lengths(&frames), [PIECE, PIECE, PIECE, 100]);
        for (_, frame) in &frames[..3] {
            assert_eq!(frame.as_ptr().align_offset(4096), 0, "a block-sized piece not on a page boundary");
            assert!(frame.is_unique(), "the page skipped before it is not let go");
        }
        assert_eq!(joined(&frames), wanted);
    }

    #[tokio::test]
    async fn a_kept_connection_the_server_closed_is_replaced_without_an_error() {
        let wanted = body(3000);
        let (addr, accepted) = serve(vec![answer(&wanted, &[], true), answer(&wanted, &[], true)]).await;
        let direct = direct(Duration::from_secs(5));
        for _ in 0..2 {
            let (_, frames) = get(&direct, addr, 1024).await.unwrap();
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
        let direct = direct(Duration::from_millis(200));
        let (_, frames) = get(&direct, addr, 2000).await.unwrap();
        assert!(frames.len() >= 2, "{:?}", lengths(&frames));
        assert!(frames[0].0 < Duration::from_millis(500), "the first part came after {:?}", frames[0].0);
        assert_eq!(joined(&frames), wanted);
    }

    #[tokio::test]
    async fn a_piece_is_waited_for_whole_but_bytes_that_trickle_in_come_within_half_the_stall_timeout() {
        // The head alone, then a few body bytes, then (much later) the rest: the connection
        // waits for a whole piece before it wakes the reader, until half the stall timeout.
        let wanted = body(2000);
        let head = format!("HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\n\r\n", wanted.len()).len();
        let mut slow = answer(&wanted, &[head, head + 200], false);
        slow.writes[2].0 = Duration::from_millis(800);
        let (addr, accepted) = serve(vec![slow, answer(&wanted, &[head], false)]).await;
        let direct = direct(Duration::from_millis(200));
        let (_, frames) = get(&direct, addr, 2000).await.unwrap();
        assert!(frames.len() >= 2, "{:?}", lengths(&frames));
        assert!(frames[0].0 < Duration::from_millis(500), "the first part came after {:?}", frames[0].0);
        assert_eq!(joined(&frames), wanted);
        // A body that arrives promptly, in one piece, after its head.
        let (_, frames) = get(&direct, addr, 2000).await.unwrap();
        assert_eq!((lengths(&frames), accepted.load(Ordering::SeqCst)), (vec![2000], 1));
        // The connection went back to the pool waking its next reader at every byte again (the
        // next answer's head may be shorter than any piece).
        let (origin, _) = origin_of(&format!("http://{addr}/").parse().unwrap()).unwrap();
        let kept = direct.take_idle(&origin).expect("the connection was kept");
        assert_eq!(wakes_at(&kept), 1);
    }

    /// The connection's `SO_RCVLOWAT`.
    fn wakes_at(connection: &Connection) -> libc::c_int {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`.
        let got = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(socket_of(connection)),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(got, 0, "getsockopt: {}", io::Error::last_os_error());
        value
    }

    #[tokio::test]
    async fn a_body_waited_for_wakes_its_reader_once_the_rest_of_the_piece_has_come() {
        // A body of one piece: 1000 bytes came with the head, the other 2000 come 300 ms after
        // the reader began to wait for them.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let wanted = body(3000);
        let sent = wanted[1000..].to_vec();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            socket.write_all(&sent).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let connection = TokioIo::new(MaybeHttpsStream::Http(TokioIo::new(TcpStream::connect(addr).await.unwrap())));
        let mut piece = PieceBody {
            connection: Some(connection),
            give_back: None,
            rest: Bytes::from(wanted[..1000].to_vec()),
            left: 2000,
            piece: 3000,
            piece_left: 0,
            filling: BytesMut::new(),
            late: None,
            stall_timeout: Duration::from_secs(10),
            wake_at: 1,
            trickling: false,
        };
        // While it waits, the socket wakes it only for the 2000 bytes the piece still lacks.
        assert!(tokio::time::timeout(Duration::from_millis(100), piece.frame()).await.is_err(), "no bytes were sent");
        assert_eq!(wakes_at(piece.connection.as_ref().unwrap()), 2000);
        let frame = piece.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(frame[..] == wanted[..], "a frame of {} bytes, not the whole piece", frame.len());
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_not_a_short_body() {
        let wanted = body(3000);
        let mut cut = answer(&wanted, &[], true);
        cut.writes[0].1.truncate(2000);
        let (addr, _) = serve(vec![cut]).await;
        let direct = direct(Duration::from_secs(5));
        let error = get(&direct, addr, 1000).await.unwrap_err();
        assert!(error.contains("before the body's end"), "{error}");
    }

    #[tokio::test]
    async fn chunked_and_close_delimited_bodies_are_read_whole_and_a_chunked_answers_connection_is_kept() {
        let chunked = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n7\r\n, world\r\n0\r\nz: 1\r\n\r\n";
        let close = b"HTTP/1.1 200 OK\r\n\r\nuntil the end";
        let (addr, accepted) = serve(vec![
            Answer {
                writes: vec![
                    (Duration::ZERO, chunked[..50].to_vec()),
                    (Duration::from_millis(5), chunked[50..].to_vec()),
                ],
                close: false,
            },
            Answer { writes: vec![(Duration::ZERO, close.to_vec())], close: true },
        ])
        .await;
        let direct = direct(Duration::from_secs(5));
        let (status, frames) = get(&direct, addr, 4).await.unwrap();
        assert_eq!((status, joined(&frames)), (404, b"hello, world".to_vec()));
        let (status, frames) = get(&direct, addr, 4).await.unwrap();
        assert_eq!((status, joined(&frames)), (200, b"until the end".to_vec()));
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "the second GET went over the chunked answer's connection");
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_a_connection_with_unasked_bytes_is_not_reused() {
        let wanted = body(1500);
        let mut first = answer(&wanted, &[], false);
        first.writes.insert(0, (Duration::ZERO, b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n".to_vec()));
        // After the answer, the server says something nobody asked for (and keeps the connection).
        first
            .writes
            .push((Duration::from_millis(10), b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n".to_vec()));
        let (addr, accepted) = serve(vec![first, answer(&wanted, &[], false)]).await;
        let direct = direct(Duration::from_secs(5));
        for _ in 0..2 {
            let (status, frames) = get(&direct, addr, 1000).await.unwrap();
            assert_eq!((status, joined(&frames)), (206, wanted.clone()));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn what_a_broken_or_hostile_server_sends_is_an_error_not_a_crash() {
        let answers = [
            // An error answer announcing 100 GB: not allocated, read within the bound.
            &b"HTTP/1.1 503 Slow Down\r\ncontent-length: 100000000000\r\n\r\n<Error>"[..],
            // A chunk size that would overflow the body's length.
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nx\r\nffffffffffffffff\r\n",
            // A coding other than chunked: the body ends with the connection.
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nnot chunked",
        ];
        let script = |bytes: &[u8]| Answer { writes: vec![(Duration::ZERO, bytes.to_vec())], close: true };
        let (addr, _) = serve(answers.iter().map(|a| script(a)).collect()).await;
        let direct = direct(Duration::from_secs(5));
        let huge = get(&direct, addr, u64::MAX).await.unwrap_err();
        assert!(huge.contains("body too long"), "{huge}");
        let overflow = get(&direct, addr, u64::MAX).await.unwrap_err();
        assert!(overflow.contains("body too long"), "{overflow}");
        let (status, frames) = get(&direct, addr, u64::MAX).await.unwrap();
        assert_eq!((status, joined(&frames)), (200, b"not chunked".to_vec()));
    }

    #[test]
    fn the_host_is_named_without_the_schemes_default_port() {
        let origin = |url: &str| origin_of(&url.parse().unwrap()).unwrap();
        assert_eq!(
            origin("https://b.s3.amazonaws.com:443/k"),
            ("https://b.s3.amazonaws.com".into(), "b.s3.amazonaws.com".into())
        );
        assert_eq!(origin("http://mirror:80/b/k"), ("http://mirror".into(), "mirror".into()));
        assert_eq!(origin("http://127.0.0.1:9000/b/k"), ("http://127.0.0.1:9000".into(), "127.0.0.1:9000".into()));
        assert_eq!(origin("https://mirror:80/b/k").1, "mirror:80");
    }
}
