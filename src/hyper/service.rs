//! The application's service as hyper calls it: each response learns whether it is its connection's last.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ::hyper::body::Incoming;
use ::hyper::{Request, Response};

use super::connection::Protocol;
use super::headers;

/// A boxed error, as hyper and tower pass them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Wraps one connection's copy of the application's tower service.
#[derive(Debug, Clone)]
pub(crate) struct HttpService<S> {
    inner: S,
    protocol: Arc<Protocol>,
    /// Set once this process is finishing (by the upgrader, without a lock): from then on, every HTTP/1
    /// response closes its connection.
    closing: Arc<AtomicBool>,
}

impl<S> HttpService<S> {
    pub(crate) fn new(inner: S, protocol: Arc<Protocol>, closing: Arc<AtomicBool>) -> Self {
        HttpService {
            inner,
            protocol,
            closing,
        }
    }
}

impl<S, B> ::hyper::service::Service<Request<Incoming>> for HttpService<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, BoxError>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let version = request.version();
        self.protocol.saw(version);
        // tower's contract: poll_ready on the clone that is then called (as hyper-util's TowerToHyperService).
        let mut inner = self.inner.clone();
        let closing = self.closing.clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| inner.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            let mut response = inner.call(request).await.map_err(Into::into)?;
            // Checked as late as possible: a response that leaves after the handover closes its connection.
            if closing.load(Ordering::Acquire) {
                headers::close_after(version, &mut response);
            }
            Ok(response)
        })
    }
}
