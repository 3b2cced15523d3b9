//! Prometheus metrics (`/metrics` on `web`, and on `agent --metrics-listen`): what the
//! fleet looks like right now, read at scrape time, in the OpenMetrics text format.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::fleet::HostStatus;
use crate::pool::Counted;
use crate::queue::QueueEntry;
use crate::state::UnixTime;

/// The content type of `encode`'s output: Prometheus's text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything one scrape shows.
pub struct Scrape {
    pub hosts: Vec<HostStatus>,
    /// Each host's queue and counters, in the hosts' order; `None` where they could
    /// not be read (a host read over SSH).
    pub stored: Vec<Option<Stored>>,
    pub now: UnixTime,
}

/// What the store keeps for one host besides its GPUs.
pub struct Stored {
    pub queue: Vec<QueueEntry>,
    pub counted: Counted,
}

/// Reads every host of the fleet (or this host alone on the embedded store) and its
/// queue. Blocking: call it off the async runtime.
pub fn gather(config: &Config) -> Result<Scrape> {
    with_queues(config, crate::fleet::read(config, None)?)
}

/// Adds each host's queue and counters to a fleet read (the hosts in the store;
/// none for a host read over SSH). Blocking.
pub fn with_queues(config: &Config, hosts: Vec<HostStatus>) -> Result<Scrape> {
    let mut store = crate::store::open(config)?;
    let stored = hosts
        .iter()
        .map(|host| {
            host.record.as_ref()?;
            store.select_host(&host.name).ok()?;
            Some(Stored {
                queue: store.queue().ok()?,
                counted: store.counted().ok()?,
            })
        })
        .collect();
    Ok(Scrape {
        hosts,
        stored,
        now: crate::session::now(),
    })
}

/// Serves `GET /metrics` on `address` from a thread of its own (`agent
/// --metrics-listen`); the address is bound before this returns, so a bad one is an
/// error at once.
pub fn serve_in_background(address: &str, config: Config) -> Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind(address)
        .map_err(|err| Error::Usage(format!("cannot listen on {address}: {err}")))?;
    let bound = listener
        .local_addr()
        .map_err(|err| Error::Runtime(format!("cannot listen on {address}: {err}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|err| Error::Runtime(format!("cannot listen on {address}: {err}")))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| Error::Runtime(format!("cannot start the metrics server: {err}")))?;
    std::thread::Builder::new()
        .name("canhazgpu-metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let config = std::sync::Arc::new(config);
                let app = axum::Router::new().route(
                    "/metrics",
                    axum::routing::get(move || {
                        let config = std::sync::Arc::clone(&config);
                        async move {
                            let scrape = tokio::task::spawn_blocking(move || gather(&config)).await;
                            let text = match scrape {
                                Ok(scrape) => scrape.and_then(|scrape| encode(&scrape)),
                                Err(err) => Err(Error::Runtime(err.to_string())),
                            };
                            response(text)
                        }
                    }),
                );
                let _ = axum::serve(listener, app).await;
            });
        })
        .map_err(|err| Error::Runtime(format!("cannot start the metrics server: {err}")))?;
    Ok(bound)
}

/// The HTTP answer for a scrape: the text, or a 503 naming what failed.
pub fn response(text: Result<String>) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    match text {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{err}\n"),
        )
            .into_response(),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    host: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    host: String,
    gpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReservedLabels {
    host: String,
    gpu: String,
    user: String,
    r#type: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Statuses every host reports a count for, also when it is zero.
const STATUSES: [&str; 4] = ["available", "in_use", "unreserved", "error"];

/// The scrape in the OpenMetrics text format.
pub fn encode(scrape: &Scrape) -> Result<String> {
    let mut registry = Registry::with_prefix("canhazgpu");
    let gpus = Family::<StatusLabels, Gauge>::default();
    let reserved = Family::<ReservedLabels, Gauge>::default();
    let memory = Family::<GpuLabels, Gauge>::default();
    let utilization = Family::<GpuLabels, FloatGauge>::default();
    let reporting = Family::<HostLabels, Gauge>::default();
    let snapshot_age = Family::<HostLabels, Gauge>::default();
    let queue_length = Family::<HostLabels, Gauge>::default();
    let oldest_wait = Family::<HostLabels, Gauge>::default();
    let allocations = Family::<HostLabels, Counter>::default();
    let failures = Family::<HostLabels, Counter>::default();

    for (host, stored) in scrape.hosts.iter().zip(&scrape.stored) {
        let name = host.name.clone();
        let at_host = HostLabels { host: name.clone() };
        let view = host.view.as_ref().ok();
        let stale = view.is_none_or(|view| view.stale.is_some());
        reporting.get_or_create(&at_host).set(i64::from(!stale));
        if let Some(reported_at) = host.record.as_ref().and_then(|record| record.reported_at) {
            snapshot_age
                .get_or_create(&at_host)
                .set((scrape.now - reported_at).max(0));
        }
        if let Some(Stored { queue, counted }) = stored {
            allocations
                .get_or_create(&at_host)
                .inc_by(counted.allocations);
            failures
                .get_or_create(&at_host)
                .inc_by(counted.allocation_failures);
            queue_length
                .get_or_create(&at_host)
                .set(i64::try_from(queue.len()).unwrap_or(i64::MAX));
            let oldest = queue.iter().map(|entry| entry.enqueue_time).min();
            oldest_wait
                .get_or_create(&at_host)
                .set(oldest.map_or(0, |since| (scrape.now - since).max(0)));
        }
        let Some(view) = view else { continue };
        for status in STATUSES {
            let count = view
                .rows
                .iter()
                .filter(|row| row.status.as_str().eq_ignore_ascii_case(status))
                .count();
            gpus.get_or_create(&StatusLabels {
                host: name.clone(),
                status: status.to_owned(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        for row in &view.rows {
            let gpu = GpuLabels {
                host: name.clone(),
                gpu: row.gpu_id.to_string(),
            };
            if let Some(mb) = row.memory_used_mb {
                memory
                    .get_or_create(&gpu)
                    .set(i64::try_from(mb.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX));
            }
            if let Some(percent) = row.utilization_percent {
                utilization
                    .get_or_create(&gpu)
                    .set(f64::from(percent) / 100.0);
            }
            if let (Some(user), Some(kind)) = (&row.user, &row.kind) {
                reserved
                    .get_or_create(&ReservedLabels {
                        host: name.clone(),
                        gpu: gpu.gpu,
                        user: user.clone(),
                        r#type: kind.to_ascii_lowercase(),
                    })
                    .set(1);
            }
        }
    }
    registry.register("gpus", "GPUs by host and status", gpus);
    registry.register(
        "gpu_reserved",
        "1 for each reserved GPU, by host, GPU, user and type (run or manual)",
        reserved,
    );
    registry.register("gpu_memory_used_bytes", "Memory in use on each GPU", memory);
    registry.register(
        "gpu_utilization_ratio",
        "Utilization of each GPU, 0 to 1",
        utilization,
    );
    registry.register(
        "host_reporting",
        "1 when the host's GPU snapshot is fresh, 0 when it is not reporting",
        reporting,
    );
    registry.register(
        "snapshot_age_seconds",
        "Seconds since the host last published its GPU snapshot",
        snapshot_age,
    );
    registry.register("queue_length", "Requests waiting for GPUs", queue_length);
    registry.register(
        "queue_oldest_wait_seconds",
        "How long the oldest waiting request has waited (0 when none waits)",
        oldest_wait,
    );
    registry.register(
        "allocations",
        "Requests granted GPUs, at once or from the queue, since the host's pool was made",
        allocations,
    );
    registry.register(
        "allocation_failures",
        "Requests refused (not enough GPUs, a GPU taken, a cap) since the host's pool was made",
        failures,
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .map_err(|err| Error::Runtime(format!("cannot encode the metrics: {err}")))?;
    Ok(exposition_format(&text))
}

/// prometheus-client writes OpenMetrics, where a counter family `x` has samples
/// `x_total` and the text ends with `# EOF`. Prometheus's text format (what
/// `promtool check metrics` checks, and every scraper reads) names the family after
/// its samples and has no end marker.
fn exposition_format(open_metrics: &str) -> String {
    let counters: Vec<&str> = open_metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines().filter(|line| *line != "# EOF") {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}
