//! The application's service as hyper calls it: each response learns whether it is its connection's last.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ::hyper::body::Incoming;
use ::hyper::{Request, Response, StatusCode, Version};

use super::connection::{Exchange, Protocol};
use super::grpc::{self, GrpcGrace};
use super::headers;
use crate::Upgrader;

/// A boxed error, as hyper and tower pass them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The application's service as the HTTP layer serves it: what [`serve`](super::serve) requires of it, named
/// once for the functions below it.
pub(crate) trait AppService<B>:
    tower_service::Service<
        Request<Incoming>,
        Response = Response<B>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + 'static
{
}

impl<T, B> AppService<B> for T
where
    T: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    T::Future: Send + 'static,
    T::Error: Into<BoxError>,
{
}

/// A response body the HTTP layer can send.
pub(crate) trait AppBody:
    http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static
{
}

impl<T> AppBody for T
where
    T: http_body::Body + Send + 'static,
    T::Data: Send,
    T::Error: Into<BoxError>,
{
}

/// Wraps one connection's copy of the application's tower service.
#[derive(Debug, Clone)]
pub(crate) struct HttpService<S> {
    /// Boxed: the connection is then `Unpin` whatever the service, so it can be taken apart after its last
    /// response (to move it).
    inner: Box<S>,
    protocol: Arc<Protocol>,
    /// Set once this process lets its connections go (by the upgrader, without a lock): from then on every
    /// HTTP/1 response closes its connection, unless the connection moves to the new process.
    closing: Arc<AtomicBool>,
    /// Where to ask whether connections move (`None`: they never do).
    upgrader: Option<Upgrader>,
}

impl<S> HttpService<S> {
    pub(crate) fn new(
        inner: S,
        protocol: Arc<Protocol>,
        closing: Arc<AtomicBool>,
        upgrader: Option<Upgrader>,
    ) -> Self {
        HttpService {
            inner: Box::new(inner),
            protocol,
            closing,
            upgrader,
        }
    }
}

/// Whether a request leaves its connection open after the response, as far as the client is concerned:
/// HTTP/1.1 unless it says `close`, HTTP/1.0 only when it says `keep-alive`.
fn keeps_open<B>(request: &Request<B>) -> bool {
    let (mut close, mut keep) = (false, false);
    for v in request.headers().get_all(::hyper::header::CONNECTION) {
        for token in v.to_str().unwrap_or("").split(',').map(str::trim) {
            close |= token.eq_ignore_ascii_case("close");
            keep |= token.eq_ignore_ascii_case("keep-alive");
        }
    }
    match request.version() {
        Version::HTTP_11 => !close,
        Version::HTTP_10 => keep && !close,
        _ => false,
    }
}

impl<S, B> ::hyper::service::Service<Request<Incoming>> for HttpService<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = Response<Exchanged<B>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Exchanged<B>>, BoxError>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let version = request.version();
        self.protocol.saw(version);
        let client_keeps_open = keeps_open(&request);
        // In flight until the response's body is over (dropped with it, or with this future on an error).
        let exchange = self.protocol.exchange();
        // tower's contract: poll_ready on the clone that is then called (as hyper-util's TowerToHyperService).
        let mut inner = (*self.inner).clone();
        let closing = self.closing.clone();
        let protocol = self.protocol.clone();
        let upgrader = self.upgrader.clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| inner.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            let mut response = inner.call(request).await.map_err(Into::into)?;
            let open = client_keeps_open
                && !headers::says_close(&response)
                && response.status() != StatusCode::SWITCHING_PROTOCOLS;
            // Checked as late as possible: a response that leaves after the handover closes its connection,
            // unless the connection moves to the new process after it.
            let mut keeps_open = open;
            if closing.load(Ordering::Acquire) && version < Version::HTTP_2 {
                if open && moves(&protocol, upgrader.as_ref()).await {
                    headers::keep_open(version, &mut response);
                } else {
                    tracing::debug!(
                        open,
                        stays = protocol.stays(),
                        "this response closes its connection"
                    );
                    headers::close_after(version, &mut response);
                    keeps_open = false;
                }
            }
            protocol.set_keeps_open(keeps_open);
            // A gRPC call still streaming at the end of the grace is ended with UNAVAILABLE.
            let grace = match upgrader {
                Some(u) if version == Version::HTTP_2 && grpc::is_grpc(&response) => {
                    Some(GrpcGrace::new(u))
                }
                _ => None,
            };
            Ok(response.map(|body| Exchanged {
                body,
                grace,
                _exchange: exchange,
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its exchange in flight until it is over (and ends a gRPC call still
    /// streaming at the end of the grace).
    pub(crate) struct Exchanged<B> {
        #[pin]
        body: B,
        grace: Option<GrpcGrace>,
        _exchange: Exchange,
    }
}

impl<B: http_body::Body> http_body::Body for Exchanged<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = self.project();
        let Some(grace) = this.grace else {
            return this.body.poll_frame(cx);
        };
        if grace.ended() {
            return Poll::Ready(None);
        }
        match this.body.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    grace.saw(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => match grace.poll_end(cx) {
                Some(trailers) => Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers)))),
                None => Poll::Pending,
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.grace.as_ref().is_some_and(GrpcGrace::ended) || self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.grace {
            Some(g) if g.ended() => http_body::SizeHint::with_exact(0),
            _ => self.body.size_hint(),
        }
    }
}

/// Whether this connection moves to the new process after its current response: the new process takes
/// connections (asked once; it answers within moments of the handover) and no move of it was refused.
async fn moves(protocol: &Protocol, upgrader: Option<&Upgrader>) -> bool {
    if protocol.stays() {
        return false;
    }
    match upgrader.and_then(Upgrader::successor) {
        Some(successor) => successor.wait_async().await.is_some(),
        None => false,
    }
}
