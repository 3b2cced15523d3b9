//! The server's access to the store and the GPUs. One thread owns the `Session`
//! (neither the store connection nor the GPU provider may be shared between
//! threads) and answers requests one at a time; the GPU status it builds is shared
//! between every request for `snapshot_interval`, so any number of viewers cost at
//! most one GPU query per interval.

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
use crate::session::{self, Session};

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

/// What the request handlers and the session thread share.
struct Shared {
    interval: Duration,
    status: Mutex<Option<Cached>>,
    snapshots: AtomicU64,
}

impl Shared {
    fn fresh_status(&self) -> Option<Answer> {
        let cached = self.status.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .as_ref()
            .filter(|c| c.fresh(self.interval))
            .map(|c| c.answer.clone())
    }
}

enum Job {
    Status(oneshot::Sender<Answer>),
    Queue(oneshot::Sender<Answer>),
    Report(u32, oneshot::Sender<Answer>),
    Health(oneshot::Sender<Result<(), ApiError>>),
}

/// The handle request handlers use; cheap to share.
pub struct Backend {
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
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
        });
        let (jobs, queue) = mpsc::channel();
        let worker_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("canhazgpu-web-session".into())
            .spawn(move || {
                // Built here: a session never leaves the thread that opened it.
                let worker = Worker {
                    config,
                    session: None,
                    shared: worker_shared,
                    reports: HashMap::new(),
                    tz: TimeZone::system(),
                };
                worker.run(queue)
            })
            .map_err(|e| Error::Runtime(format!("cannot start the session thread: {e}")))?;
        Ok(Backend { jobs, shared })
    }

    /// `status --json` of every GPU, at most `snapshot_interval` old.
    pub async fn status(&self) -> Answer {
        match self.shared.fresh_status() {
            Some(answer) => answer,
            None => self.ask(Job::Status).await?,
        }
    }

    /// `queue --json`: the requests waiting for GPUs. Cheap (no GPU query), so
    /// never cached.
    pub async fn queue(&self) -> Answer {
        self.ask(Job::Queue).await?
    }

    /// `report --json --days N`, at most `snapshot_interval` old.
    pub async fn report(&self, days: u32) -> Answer {
        self.ask(|reply| Job::Report(days, reply)).await?
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
    shared: Arc<Shared>,
    reports: HashMap<u32, Cached>,
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
                Job::Queue(reply) => {
                    let _ = reply.send(self.with_session(Session::queue_report).and_then(to_json));
                }
                Job::Report(days, reply) => {
                    let _ = reply.send(self.report(days));
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

    fn report(&mut self, days: u32) -> Answer {
        let interval = self.shared.interval;
        if let Some(cached) = self.reports.get(&days).filter(|c| c.fresh(interval)) {
            return cached.answer.clone();
        }
        let tz = self.tz.clone();
        let answer = self
            .with_session(|s| {
                crate::session::usage_report(s.store.as_mut(), &s.host, days, session::now(), &tz)
            })
            .and_then(to_json);
        // Keep only fresh reports, so that the cache stays as small as the traffic.
        self.reports.retain(|_, c| c.fresh(interval));
        self.reports.insert(
            days,
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
        let session = match self.session.take() {
            Some(session) => session,
            None => Session::open(&self.config)?,
        };
        let result = work(self.session.insert(session));
        if let Err(Error::Store(_)) = result {
            self.session = None;
        }
        result.map_err(ApiError::from)
    }
}

fn to_json(value: impl serde::Serialize) -> Answer {
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| ApiError::from(Error::Runtime(format!("cannot encode JSON: {e}"))))
}
