//! Small HTTP/1 servers (health, metrics, healthCheckNodePorts) shared by both planes: hyper,
//! one task per connection, a plain function from the request path to the response.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub type Reply = Response<Full<Bytes>>;

/// Serves `listener` until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, handler: Arc<dyn Fn(&str) -> Reply + Send + Sync>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(error) => {
                tracing::debug!(%error, "accept failed");
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let reply = handler(req.uri().path());
                async move { Ok::<_, Infallible>(reply) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// A response with a status, headers and a body.
pub fn reply(status: u16, headers: &[(&str, String)], body: String) -> Reply {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    b.body(Full::new(Bytes::from(body))).unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

pub fn not_found() -> Reply {
    reply(404, &[], "404 page not found\n".into())
}
