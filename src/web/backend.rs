//! The server's access to the store and the GPUs. One thread owns the `Session`
//! (neither the store connection nor the GPU provider may be shared between
//! threads) and answers requests one at a time; the GPU status it builds is shared
//! between every request for `snapshot_interval`, so any number of viewers cost at
//! most one GPU query per interval. The fleet (every host's status) is read the
//! same way, at most once per interval, on a blocking thread of its own: hosts read
//! over SSH may take seconds and must not hold up this host's requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::StatusCode;
use jiff::tz::TimeZone;
use tokio::sync::oneshot;

use crate::config::Config;
use crate::error::Error;
use crate::fleet::{self, HostStatus};
use crate::session::{self, Session};
use crate::state::UnixTime;
use crate::store::{self, Store};

/// A failed request: the HTTP status and the message of the JSON error body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn not_found() -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: "not found".into(),
        }
    }

    /// A host the store does not know, with the ones it does.
    pub fn unknown_host(name: &str, known: &[String]) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("unknown host '{name}' (known hosts: {})", known.join(", ")),
        }
    }

    fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        let status = match err {
            Error::Usage(_) => StatusCode::BAD_REQUEST,
            Error::Runtime(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError {
            status,
            message: err.to_string(),
        }
    }
}

/// A JSON document, or why it could not be made.
pub type Answer = Result<Bytes, ApiError>;

/// An answer and when it was computed.
#[derive(Clone)]
struct Cached {
    taken: Instant,
    answer: Answer,
}

impl Cached {
    fn fresh(&self, interval: Duration) -> bool {
        self.taken.elapsed() < interval
    }
}

/// Every host of the fleet as one read found them (`fleet::read`), with the
/// answers for all of them encoded once: a fleet of hundreds of hosts is a large
/// document, which every viewer then gets from memory.
pub struct Fleet {
    pub hosts: Vec<HostStatus>,
    pub read_at: UnixTime,
    /// `/api/hosts`.
    pub overview: Answer,
    /// `/api/hosts/status` without `host`.
    pub statuses: Answer,
}

impl Fleet {
    fn new(hosts: Vec<HostStatus>, read_at: UnixTime) -> Self {
        let overview = to_json(super::hosts::overview(&hosts, read_at));
        let statuses = super::hosts::statuses(&hosts, read_at, None).and_then(to_json);
        Fleet {
            hosts,
            read_at,
            overview,
            statuses,
        }
    }
}

/// A fleet read, or why it failed, and when it was made.
struct CachedFleet {
    taken: Instant,
    fleet: Result<Arc<Fleet>, ApiError>,
}

/// What the request handlers and the session thread share.
struct Shared {
    interval: Duration,
    status: Mutex<Option<Cached>>,
    snapshots: AtomicU64,
    fleet: Mutex<Option<CachedFleet>>,
    fleet_reads: AtomicU64,
}

impl Shared {
    fn fresh_status(&self) -> Option<Answer> {
        let cached = self.status.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .as_ref()
            .filter(|c| c.fresh(self.interval))
            .map(|c| c.answer.clone())
    }

    fn fresh_fleet(&self) -> Option<Result<Arc<Fleet>, ApiError>> {
        let cached = self.fleet.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .as_ref()
            .filter(|c| c.taken.elapsed() < self.interval)
            .map(|c| c.fleet.clone())
    }
}

/// Whose usage a report adds up.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ReportScope {
    /// This host (no `host` parameter).
    Local,
    /// One host of the store (`host=NAME`), checked against it before use.
    Host(String),
    /// Every host (`host=all`).
    Fleet,
}

enum Job {
    Status(oneshot::Sender<Answer>),
    Queue(Option<String>, oneshot::Sender<Answer>),
    Report(u32, ReportScope, oneshot::Sender<Answer>),
    Health(oneshot::Sender<Result<(), ApiError>>),
}

/// The handle request handlers use; cheap to share.
pub struct Backend {
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    config: Config,
    /// Held while the fleet is read, so that requests arriving meanwhile wait for
    /// that read instead of starting their own.
    fleet_read: tokio::sync::Mutex<()>,
}

/// How long a health check waits for the store before calling it unreachable.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

impl Backend {
    /// Starts the session thread. It ends when the `Backend` is dropped.
    pub fn start(config: Config, snapshot_interval: Duration) -> crate::error::Result<Self> {
        let shared = Arc::new(Shared {
            interval: snapshot_interval,
            status: Mutex::new(None),
            snapshots: AtomicU64::new(0),
            fleet: Mutex::new(None),
            fleet_reads: AtomicU64::new(0),
        });
        let (jobs, queue) = mpsc::channel();
        let worker_shared = Arc::clone(&shared);
        let worker_config = config.clone();
        std::thread::Builder::new()
            .name("canhazgpu-web-session".into())
            .spawn(move || {
                // Built here: a session never leaves the thread that opened it.
                let worker = Worker {
                    config: worker_config,
                    session: None,
                    store: None,
                    shared: worker_shared,
                    reports: HashMap::new(),
                    tz: TimeZone::system(),
                };
                worker.run(queue)
            })
            .map_err(|e| Error::Runtime(format!("cannot start the session thread: {e}")))?;
        Ok(Backend {
            jobs,
            shared,
            config,
            fleet_read: tokio::sync::Mutex::new(()),
        })
    }

    /// `status --json` of every GPU, at most `snapshot_interval` old.
    pub async fn status(&self) -> Answer {
        match self.shared.fresh_status() {
            Some(answer) => answer,
            None => self.ask(Job::Status).await?,
        }
    }

    /// `queue --json` (`--host NAME` when given): the requests waiting for GPUs.
    /// Cheap (no GPU query), so never cached.
    pub async fn queue(&self, host: Option<String>) -> Answer {
        self.ask(|reply| Job::Queue(host, reply)).await?
    }

    /// `report --json --days N` of `scope`, at most `snapshot_interval` old.
    pub async fn report(&self, days: u32, scope: ReportScope) -> Answer {
        self.ask(|reply| Job::Report(days, scope, reply)).await?
    }

    /// Every host's status (`status --all`), at most `snapshot_interval` old.
    pub async fn fleet(&self) -> Result<Arc<Fleet>, ApiError> {
        if let Some(fleet) = self.shared.fresh_fleet() {
            return fleet;
        }
        let _reading = self.fleet_read.lock().await;
        // Requests that waited for the read in progress get its result.
        if let Some(fleet) = self.shared.fresh_fleet() {
            return fleet;
        }
        self.shared.fleet_reads.fetch_add(1, Ordering::Relaxed);
        let config = self.config.clone();
        let read = tokio::task::spawn_blocking(move || {
            fleet::read(&config, None).map(|hosts| Fleet::new(hosts, session::now()))
        })
        .await;
        let fleet = match read {
            Ok(read) => read.map(Arc::new).map_err(ApiError::from),
            Err(e) => Err(ApiError::from(Error::Runtime(format!(
                "the fleet read failed: {e}"
            )))),
        };
        let mut cached = self.shared.fleet.lock().unwrap_or_else(|e| e.into_inner());
        *cached = Some(CachedFleet {
            taken: Instant::now(),
            fleet: fleet.clone(),
        });
        fleet
    }

    /// The fleet (as `fleet` caches it) with each host's queue, for `/metrics`.
    pub async fn metrics(&self) -> crate::error::Result<String> {
        let fleet = self
            .fleet()
            .await
            .map_err(|err| Error::Runtime(err.message))?;
        let (config, hosts) = (self.config.clone(), fleet.hosts.clone());
        let scrape =
            tokio::task::spawn_blocking(move || crate::metrics::with_queues(&config, hosts))
                .await
                .map_err(|err| Error::Runtime(format!("the metrics read failed: {err}")))??;
        crate::metrics::encode(&scrape)
    }

    /// Whether the store answers.
    pub async fn health(&self) -> Result<(), ApiError> {
        tokio::time::timeout(HEALTH_TIMEOUT, self.ask(Job::Health))
            .await
            .map_err(|_| ApiError::unavailable("the store did not answer in time"))??
    }

    /// How many GPU snapshots the server has taken so far.
    pub fn snapshots(&self) -> u64 {
        self.shared.snapshots.load(Ordering::Relaxed)
    }

    /// How many times the server has read the fleet so far.
    pub fn fleet_reads(&self) -> u64 {
        self.shared.fleet_reads.load(Ordering::Relaxed)
    }

    pub fn snapshot_interval(&self) -> Duration {
        self.shared.interval
    }

    async fn ask<T>(&self, job: impl FnOnce(oneshot::Sender<T>) -> Job) -> Result<T, ApiError> {
        let gone = || ApiError::unavailable("the server is shutting down");
        let (reply, answer) = oneshot::channel();
        self.jobs.send(job(reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())
    }
}

/// The session thread's state.
struct Worker {
    config: Config,
    /// Opened on first use and dropped after a store error, so that the next request
    /// reconnects.
    session: Option<Session>,
    /// For requests about a named host or the whole fleet: unlike the session, it
    /// needs no pool of this host (a login node's dashboard). Reopened like it.
    store: Option<Box<dyn Store>>,
    shared: Arc<Shared>,
    reports: HashMap<(u32, ReportScope), Cached>,
    tz: TimeZone,
}

impl Worker {
    fn run(mut self, queue: mpsc::Receiver<Job>) {
        // A requester that gave up has dropped its receiver; nothing to do then.
        for job in queue {
            match job {
                Job::Status(reply) => {
                    let _ = reply.send(self.status());
                }
                Job::Queue(None, reply) => {
                    let _ = reply.send(self.with_session(Session::queue_report).and_then(to_json));
                }
                Job::Queue(Some(host), reply) => {
                    let _ = reply.send(self.host_queue(&host));
                }
                Job::Report(days, scope, reply) => {
                    let _ = reply.send(self.report(days, scope));
                }
                Job::Health(reply) => {
                    let _ = reply.send(self.with_session(|s| s.store.pool().map(drop)));
                }
            }
        }
    }

    fn status(&mut self) -> Answer {
        // Requests that queued up while a snapshot was taken get that snapshot.
        if let Some(answer) = self.shared.fresh_status() {
            return answer;
        }
        self.shared.snapshots.fetch_add(1, Ordering::Relaxed);
        let answer = self.with_session(Session::status).and_then(to_json);
        let mut cached = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        *cached = Some(Cached {
            taken: Instant::now(),
            answer: answer.clone(),
        });
        answer
    }

    /// `queue --json --host NAME`, for a host the store knows.
    fn host_queue(&mut self, host: &str) -> Answer {
        self.known_host(host)?;
        let local = self.config.host_name.clone();
        self.with_store(|store| {
            store.select_host(host)?;
            let entries = store.queue()?;
            // Only this host's waiters can be checked for being alive.
            let dead_ids = session::dead_waiter_ids(&entries, &local);
            Ok(crate::queue::report(&entries, &dead_ids, session::now()))
        })
        .and_then(to_json)
    }

    fn report(&mut self, days: u32, scope: ReportScope) -> Answer {
        let interval = self.shared.interval;
        let key = (days, scope);
        if let Some(cached) = self.reports.get(&key).filter(|c| c.fresh(interval)) {
            return cached.answer.clone();
        }
        let (tz, local) = (self.tz.clone(), self.config.host_name.clone());
        let answer = match &key.1 {
            ReportScope::Local => self.with_session(|s| {
                session::usage_report(s.store.as_mut(), &s.host, days, session::now(), &tz)
            }),
            ReportScope::Host(host) => self.known_host(host).and_then(|()| {
                self.with_store(|store| {
                    store.select_host(host)?;
                    session::usage_report(store, &local, days, session::now(), &tz)
                })
            }),
            ReportScope::Fleet => self.with_store(|store| {
                session::fleet_report(store, &local, days, session::now(), &tz)
            }),
        }
        .and_then(to_json);
        // An unknown host is not remembered: only names the store knows are keys.
        if answer
            .as_ref()
            .is_err_and(|err| err.status == StatusCode::NOT_FOUND)
        {
            return answer;
        }
        // Keep only fresh reports, so that the cache stays as small as the traffic.
        self.reports.retain(|_, c| c.fresh(interval));
        self.reports.insert(
            key,
            Cached {
                taken: Instant::now(),
                answer: answer.clone(),
            },
        );
        answer
    }

    fn with_session<T>(
        &mut self,
        work: impl FnOnce(&mut Session) -> crate::error::Result<T>,
    ) -> Result<T, ApiError> {
        reopening(&mut self.session, || Session::open(&self.config), work)
    }

    fn with_store<T>(
        &mut self,
        work: impl FnOnce(&mut dyn Store) -> crate::error::Result<T>,
    ) -> Result<T, ApiError> {
        reopening(
            &mut self.store,
            || store::open(&self.config),
            |store| work(store.as_mut()),
        )
    }

    /// A request value naming a host is used only once the store knows that host.
    fn known_host(&mut self, name: &str) -> Result<(), ApiError> {
        let known: Vec<String> = self
            .with_store(|store| store.hosts())?
            .into_iter()
            .map(|host| host.name)
            .collect();
        match known.iter().any(|host| host == name) {
            true => Ok(()),
            false => Err(ApiError::unknown_host(name, &known)),
        }
    }
}

/// Runs `work` on the connection in `slot`, opened first if there is none; a
/// store error drops it, so that the next request reconnects.
fn reopening<S, T>(
    slot: &mut Option<S>,
    open: impl FnOnce() -> crate::error::Result<S>,
    work: impl FnOnce(&mut S) -> crate::error::Result<T>,
) -> Result<T, ApiError> {
    let connection = match slot.take() {
        Some(connection) => connection,
        None => open()?,
    };
    let result = work(slot.insert(connection));
    if let Err(Error::Store(_)) = result {
        *slot = None;
    }
    result.map_err(ApiError::from)
}

pub fn to_json(value: impl serde::Serialize) -> Answer {
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| ApiError::from(Error::Runtime(format!("cannot encode JSON: {e}"))))
}
