//! The HTTP server of `/metrics`, `/healthz` and `/readyz`, and of the
//! console when there is one (src/console/mod.rs). It listens only where it
//! is told ([`parse_metrics_addr`]: loopback unless configured).

use super::health::Health;
use super::metrics::{Metrics, CONTENT_TYPE};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Where the server listens unless `METRICS_ADDR` says otherwise.
pub const DEFAULT_METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);

/// Reads `METRICS_ADDR`: `host:port` with an IP address (`[::1]:9464` for
/// IPv6) or `localhost`; `off` disables the server (`Ok(None)`).
pub fn parse_metrics_addr(raw: &str) -> Result<Option<SocketAddr>, String> {
    let value = raw.trim();
    if value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let problem = || {
        format!(
            "METRICS_ADDR {raw:?} is not an address: give ip:port (e.g. 127.0.0.1:9464, \
             0.0.0.0:9464 to listen on every interface, [::1]:9464) or off"
        )
    };
    if let Some(port) = value.strip_prefix("localhost:") {
        let port: u16 = port.parse().map_err(|_| problem())?;
        return Ok(Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)));
    }
    value.parse::<SocketAddr>().map(Some).map_err(|_| problem())
}

/// What the server answers from.
#[derive(Debug, Clone)]
pub struct Observed {
    pub metrics: &'static Metrics,
    pub health: Health,
    /// `/healthz` fails when the runtime loop has not turned for this long.
    pub live_within: Duration,
    /// The console's page and JSON at `/` and `/api/...` (`None`: not served).
    pub console: Option<Arc<crate::console::Console>>,
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// The address it listens on (the port chosen when 0 was asked for).
    pub local_addr: SocketAddr,
    pub task: JoinHandle<()>,
}

/// Binds `addr` (an error here is the operator's to fix: the port is taken,
/// the address is not this host's) and serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    observed: Observed,
    shutdown: CancellationToken,
) -> std::io::Result<Server> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    let console = observed.console.clone();
    let mut app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(observed));
    if let Some(console) = console {
        tokio::spawn(console.clone().run(shutdown.clone()));
        app = app.merge(crate::console::routes(console));
    }
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::warn!(error = %err, "the metrics server stopped");
        }
    });
    tracing::info!(address = %local_addr, "serving /metrics, /healthz and /readyz");
    Ok(Server { local_addr, task })
}

async fn metrics(State(observed): State<Arc<Observed>>) -> Response {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        observed.metrics.render(),
    )
        .into_response()
}

async fn healthz(State(observed): State<Arc<Observed>>) -> Response {
    let silent = observed.health.since_tick();
    let alive = silent <= observed.live_within;
    let body = serde_json::json!({
        "alive": alive,
        "loop_silent_seconds": silent.as_secs_f64(),
    });
    let status = if alive {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn readyz(State(observed): State<Arc<Observed>>) -> Response {
    let readiness = observed.health.readiness();
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(parse_metrics_addr("off"), Ok(None));
        assert_eq!(parse_metrics_addr(" OFF "), Ok(None));
        assert_eq!(
            parse_metrics_addr("127.0.0.1:9464"),
            Ok(Some(DEFAULT_METRICS_ADDR))
        );
        assert_eq!(
            parse_metrics_addr("localhost:9000"),
            Ok(Some(
                "127.0.0.1:9000".parse().unwrap_or(DEFAULT_METRICS_ADDR)
            ))
        );
        assert_eq!(
            parse_metrics_addr("[::1]:9464").map(|a| a.map(|a| a.ip().is_loopback())),
            Ok(Some(true))
        );
        assert_eq!(
            parse_metrics_addr("0.0.0.0:1").map(|a| a.map(|a| a.port())),
            Ok(Some(1))
        );
        for bad in [
            "",
            "9464",
            "127.0.0.1",
            "127.0.0.1:99999",
            "example.com:9464",
            "on",
        ] {
            let err = parse_metrics_addr(bad).expect_err(bad);
            assert!(err.contains("METRICS_ADDR"), "{err}");
            assert!(err.contains("or off"), "{err}");
        }
    }
}
