//! `canhazgpu web`: the dashboard and its JSON API (axum on tokio).
//!
//! Routes: `/` (the dashboard, static files embedded in the binary), `/api/status`
//! (as `status --json`), `/api/queue[?host=NAME]` (as `queue --json [--host]`),
//! `/api/report?days=N[&host=NAME|all]` (as `report --json [--host|--all]`),
//! `/api/hosts` (the fleet's hosts: local, last report, stale, source),
//! `/api/hosts/status[?host=NAME]` (each host's GPUs and summary, as `status --all`),
//! `/api/info` (hostname and links for the page header), `/healthz`.
//!
//! Request parameters never reach a shell or another host: `days` is parsed as a
//! number, and `host` is used only once it is found among the hosts the store (or,
//! for `/api/hosts/status`, the fleet read) knows; an unknown one is a 404. Only
//! configured `remote_hosts` are ever asked over SSH, by `fleet::read`.

mod backend;
mod hosts;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::error::Result;
use crate::gpu::procinfo;
use crate::report::{self, DEFAULT_DAYS};

pub use backend::ApiError;
use backend::{Answer, Backend, ReportScope, to_json};

/// How long one GPU snapshot is shared between requests by default.
pub const DEFAULT_SNAPSHOT_SECONDS: u64 = 5;
/// Where the dashboard's repository link points while `Cargo.toml` names no
/// `repository` of this project.
const UPSTREAM_REPOSITORY: &str = "https://github.com/russellb/canhazgpu";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeOptions {
    /// At most one GPU snapshot (and one report per period) is taken per interval;
    /// every request within it gets the same one.
    pub snapshot_interval: Duration,
}

/// Serves the dashboard on `listener` until `shutdown` completes, then finishes the
/// requests in flight and returns. The store need not be reachable at start: the API
/// answers 503 until it is.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let backend = Arc::new(Backend::start(config, options.snapshot_interval)?);
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stopping.send(true);
    });
    let server = accept_loop(listener, router(backend), stopped.clone());
    // Requests in flight get a grace period; a client that never finishes sending
    // its request cannot keep the server from stopping.
    let mut grace_stopped = stopped;
    let grace = async move {
        let _ = grace_stopped.wait_for(|stop| *stop).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        () = server => Ok(()),
        () = grace => Ok(()),
    }
}

/// Completes once shutdown was asked for (holding no borrow of the flag).
async fn stopping(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// A client gets this long to send a request's headers, also while its connection
/// is idle between requests; then the connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once; further ones are closed at once until one ends.
pub const MAX_CONNECTIONS: usize = 4096;

/// Serves connections until `stopped`, then lets each finish its request in flight.
/// Unlike `axum::serve`, a client that never finishes its request, or keeps an idle
/// connection, is cut off after `HEADER_READ_TIMEOUT`, and at most
/// `MAX_CONNECTIONS` are open at once, so half-open connections cannot pile up.
async fn accept_loop(listener: TcpListener, router: Router, stopped: watch::Receiver<bool>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    let mut stop = stopped.clone();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors, say: wait for connections to end.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = stopping(&mut stop) => break,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let mut stop = stopped.clone();
        connections.spawn(async move {
            let _permit = permit;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stopping(&mut stop) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
}

/// How long requests in flight may take to finish once shutdown was asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

fn router(backend: Arc<Backend>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| static_file(INDEX_HTML, "text/html; charset=utf-8")),
        )
        .route(
            "/app.js",
            get(|| static_file(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/style.css",
            get(|| static_file(STYLE_CSS, "text/css; charset=utf-8")),
        )
        .route(
            "/README.md",
            get(|| static_file(README, "text/plain; charset=utf-8")),
        )
        .route("/api/status", get(api_status))
        .route("/api/queue", get(api_queue))
        .route("/api/report", get(api_report))
        .route("/api/hosts", get(api_hosts))
        .route("/api/hosts/status", get(api_hosts_status))
        .route("/api/info", get(api_info))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async { json_error(&ApiError::not_found()) })
        .layer(axum::middleware::map_response(security_headers))
        .with_state(backend)
}

const INDEX_HTML: &str = include_str!("static/index.html");
const APP_JS: &str = include_str!("static/app.js");
const STYLE_CSS: &str = include_str!("static/style.css");
const README: &str = include_str!("../../README.md");

async fn static_file(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// The page loads only its own script and styles, so injected markup could not
/// run even if some value were ever rendered as HTML.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn json_error(err: &ApiError) -> Response {
    let body = json!({ "error": err.message }).to_string();
    json_response(err.status, Bytes::from(body))
}

fn answer(answer: Answer) -> Response {
    match answer {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(err) => json_error(&err),
    }
}

async fn metrics(State(backend): State<Arc<Backend>>) -> Response {
    crate::metrics::response(backend.metrics().await)
}

async fn api_status(State(backend): State<Arc<Backend>>) -> Response {
    answer(backend.status().await)
}

/// The query string's pairs; a malformed one is a 400.
type QueryPairs =
    std::result::Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>;

fn pairs(query: QueryPairs) -> std::result::Result<Vec<(String, String)>, ApiError> {
    query
        .map(|Query(pairs)| pairs)
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
}

async fn api_queue(State(backend): State<Arc<Backend>>, query: QueryPairs) -> Response {
    match pairs(query).and_then(|pairs| host_param(&pairs)) {
        Ok(host) => answer(backend.queue(host).await),
        Err(err) => json_error(&err),
    }
}

async fn api_report(State(backend): State<Arc<Backend>>, query: QueryPairs) -> Response {
    let params = pairs(query).and_then(|pairs| {
        let scope = match host_param(&pairs)? {
            None => ReportScope::Local,
            Some(host) if host == "all" => ReportScope::Fleet,
            Some(host) => ReportScope::Host(host),
        };
        Ok((days_param(&pairs)?, scope))
    });
    match params {
        Ok((days, scope)) => answer(backend.report(days, scope).await),
        Err(err) => json_error(&err),
    }
}

async fn api_hosts(State(backend): State<Arc<Backend>>) -> Response {
    match backend.fleet().await {
        Ok(fleet) => answer(fleet.overview.clone()),
        Err(err) => json_error(&err),
    }
}

async fn api_hosts_status(State(backend): State<Arc<Backend>>, query: QueryPairs) -> Response {
    let host = match pairs(query).and_then(|pairs| host_param(&pairs)) {
        Ok(host) => host,
        Err(err) => return json_error(&err),
    };
    match (backend.fleet().await, host) {
        (Ok(fleet), None) => answer(fleet.statuses.clone()),
        (Ok(fleet), Some(host)) => {
            answer(hosts::statuses(&fleet.hosts, fleet.read_at, Some(&host)).and_then(to_json))
        }
        (Err(err), _) => json_error(&err),
    }
}

/// The one value of `key`, if given; twice is an error, never one of them.
fn single<'a>(
    pairs: &'a [(String, String)],
    key: &str,
) -> std::result::Result<Option<&'a str>, ApiError> {
    let mut values = pairs.iter().filter(|(k, _)| k == key);
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some((_, value)), None) => Ok(Some(value)),
        (Some(_), Some(_)) => Err(ApiError::bad_request(format!(
            "'{key}' is given more than once"
        ))),
    }
}

/// `days` from the query: absent means the default; anything but one whole number
/// from 1 to `report::MAX_DAYS` is an error, never silently the default.
fn days_param(pairs: &[(String, String)]) -> std::result::Result<u32, ApiError> {
    match single(pairs, "days")? {
        None => Ok(DEFAULT_DAYS),
        Some(value) => report::parse_days(value).map_err(|e| ApiError::bad_request(e.to_string())),
    }
}

/// `host` from the query, when it looks like a host name; whether the fleet knows
/// it is checked where it is used.
fn host_param(pairs: &[(String, String)]) -> std::result::Result<Option<String>, ApiError> {
    let Some(name) = single(pairs, "host")? else {
        return Ok(None);
    };
    let valid = name.len() <= 253
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    match valid {
        true => Ok(Some(name.to_string())),
        false => Err(ApiError::bad_request(format!(
            "'host' must be a host name (letters, digits, '.', '_', '-', '@'), got {name:?}"
        ))),
    }
}

async fn api_info() -> Response {
    let ours = env!("CARGO_PKG_REPOSITORY");
    let body = json!({
        "hostname": procinfo::hostname(),
        "version": env!("CARGO_PKG_VERSION"),
        "repository": if ours.is_empty() { UPSTREAM_REPOSITORY } else { ours },
        "repository_is_upstream": ours.is_empty(),
        "readme": "/README.md",
    });
    json_response(StatusCode::OK, Bytes::from(body.to_string()))
}

/// 200 when the store answers, 503 when it does not; the body says which, and how
/// many GPU snapshots the server has taken.
async fn healthz(State(backend): State<Arc<Backend>>) -> Response {
    let (status, store) = match backend.health().await {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(err) => (err.status, err.message),
    };
    let body = json!({
        "status": if status == StatusCode::OK { "ok" } else { "degraded" },
        "store": store,
        "gpu_snapshots": backend.snapshots(),
        "fleet_reads": backend.fleet_reads(),
        "snapshot_interval_seconds": backend.snapshot_interval().as_secs_f64(),
    });
    json_response(status, Bytes::from(body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn days_parameter_is_strict() {
        assert_eq!(days_param(&pairs(&[])), Ok(DEFAULT_DAYS));
        assert_eq!(days_param(&pairs(&[("days", "7"), ("host", "x")])), Ok(7));
        for bad in ["0", "-3", "abc", "1.5", ""] {
            let err = days_param(&pairs(&[("days", bad)])).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        assert!(days_param(&pairs(&[("days", "1"), ("days", "2")])).is_err());
    }

    #[test]
    fn host_parameter_is_a_host_name_or_an_error() {
        assert_eq!(host_param(&pairs(&[("days", "1")])), Ok(None));
        assert_eq!(
            host_param(&pairs(&[("host", "gpu-1.example_x")])),
            Ok(Some("gpu-1.example_x".into()))
        );
        for bad in [
            "",
            "-oProxyCommand=x",
            "a b",
            "$(touch x)",
            "a/b",
            &"a".repeat(254),
        ] {
            let err = host_param(&pairs(&[("host", bad)])).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        let err = host_param(&pairs(&[("host", "a"), ("host", "b")])).unwrap_err();
        assert_eq!(err.message, "'host' is given more than once");
    }
}
