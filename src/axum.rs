//! axum in one call (feature `axum`): [`serve`] is `axum::serve` for a service that upgrades itself.
//!
//! ```no_run
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let upgrader = exuvia::Upgrader::builder().build()?; // before the runtime starts its threads
//!     let listener = upgrader.listen_tcp("http", "127.0.0.1:8080")?;
//!     tokio::runtime::Runtime::new()?.block_on(async move {
//!         upgrader.handle_signals_tokio()?;
//!         let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello\n" }));
//!         upgrader.ready()?;
//!         let report = exuvia::axum::serve(&upgrader, listener, app).await?;
//!         eprintln!("drained {}, left {}", report.drained, report.left);
//!         Ok(())
//!     })
//! }
//! ```
//!
//! What happens to each kind of connection when the process hands over or stops is in
//! [`exuvia::hyper`](crate::hyper); this is the same server with axum's conveniences.

use std::convert::Infallible;
use std::task::{Context, Poll};

use ::axum::extract::ConnectInfo;
use ::axum::routing::future::RouteFuture;
use ::axum::Router;
use ::hyper::body::Incoming;
use ::hyper::Request;

use crate::error::Result;
use crate::hyper::Listener;
use crate::{DrainReport, Upgrader};

/// Serves `app` on `listener` (from [`Upgrader::listen_tcp`] or [`Upgrader::listen_unix`], or wrapped in
/// [`TcpIncoming`](crate::tokio::TcpIncoming)) until this process is finishing, then drains and returns how the
/// drain went, at the drain deadline at the latest. Handlers can extract
/// `ConnectInfo<std::net::SocketAddr>` (TCP) or `ConnectInfo<tokio::net::unix::SocketAddr>` (Unix) as with
/// `into_make_service_with_connect_info`.
///
/// # Errors
/// As [`exuvia::hyper::serve`](crate::hyper::serve).
///
/// # Cancel safety
/// As [`exuvia::hyper::serve`](crate::hyper::serve): await it to the end.
pub async fn serve<L: Listener>(
    upgrader: &Upgrader,
    listener: L,
    app: Router,
) -> Result<DrainReport> {
    crate::hyper::serve_with(upgrader, listener, move |peer: &_| WithConnectInfo {
        app: app.clone(),
        peer: peer.clone(),
    })
    .await
}

/// The router with the connection's peer address put in each request, where `ConnectInfo` looks for it.
#[derive(Clone)]
struct WithConnectInfo<P> {
    app: Router,
    peer: P,
}

impl<P: Clone + Send + Sync + 'static> tower_service::Service<Request<Incoming>>
    for WithConnectInfo<P>
{
    type Response = ::axum::response::Response;
    type Error = Infallible;
    type Future = RouteFuture<Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Infallible>> {
        tower_service::Service::<Request<Incoming>>::poll_ready(&mut self.app, cx)
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        request
            .extensions_mut()
            .insert(ConnectInfo(self.peer.clone()));
        self.app.call(request)
    }
}
