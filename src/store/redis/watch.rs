//! Wake-ups through Redis pub/sub: a subscription to one channel, on its own
//! connection and thread (a subscribed connection can do nothing else). Messages are
//! hints; the waiter's periodic turn stays the source of truth, so a lost connection
//! only means a slower wake-up, never a failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use super::connection::{Server, one_line};
use crate::error::{Error, Result};
use crate::store::Wake;

/// How long the subscriber blocks before it checks whether it is still wanted: long,
/// since hundreds of waiters may each have one.
const SUBSCRIBER_POLL: Duration = Duration::from_secs(5);

/// A subscription; dropping it ends the thread (within `SUBSCRIBER_POLL`).
pub(super) struct Watch {
    stop: Arc<AtomicBool>,
}

impl Watch {
    /// Subscribes to `channel` and returns once the subscription is in place, so no
    /// message published afterwards is missed. `wake` is called for every message,
    /// and once more whenever the connection was lost (something may have been). A
    /// new connection goes to the master the sentinels name then, if any.
    pub(super) fn start(
        server: &Server,
        location: &str,
        channel: String,
        wake: Wake,
    ) -> Result<Watch> {
        let (ready, subscribed) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let server = server.clone();
        let location = location.to_string();
        std::thread::Builder::new()
            .name("queue-wake".into())
            .spawn(move || {
                let mut ready = Some(ready);
                while !stopped.load(Ordering::Relaxed) {
                    let outcome =
                        subscribe(&server, &location, &channel, &mut ready, &stopped, &wake);
                    match (outcome, ready.take()) {
                        // Failed before subscribing: the caller hears why.
                        (Err(err), Some(ready)) => {
                            let _ = ready.send(Err(err));
                            return;
                        }
                        (Err(_), None) => {
                            wake();
                            std::thread::sleep(SUBSCRIBER_POLL);
                        }
                        (Ok(()), _) => return,
                    }
                }
            })
            .map_err(|err| Error::Runtime(format!("cannot start the queue thread: {err}")))?;
        subscribed
            .recv()
            .unwrap_or_else(|_| Err(Error::Runtime("the queue thread ended".into())))?;
        Ok(Watch { stop })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Subscribes on a new connection and forwards messages until stopped (`Ok`) or the
/// connection fails (`Err`). Reports the subscription through `ready` once.
fn subscribe(
    server: &Server,
    location: &str,
    channel: &str,
    ready: &mut Option<mpsc::Sender<Result<()>>>,
    stop: &AtomicBool,
    wake: &Wake,
) -> Result<()> {
    let failed = |err: redis::RedisError| {
        Error::Store(format!("Redis at {location} failed: {}", one_line(&err)))
    };
    // The subscription's reply may be slow under load: it gets the connection's
    // full reply timeout, the short poll timeout is set only once it is in place.
    let (mut connection, _) = server.open(location).map_err(|refused| refused.error)?;
    let mut pubsub = connection.as_pubsub();
    pubsub.subscribe(channel).map_err(failed)?;
    pubsub
        .set_read_timeout(Some(SUBSCRIBER_POLL))
        .map_err(failed)?;
    if let Some(ready) = ready.take() {
        let _ = ready.send(Ok(()));
    }
    while !stop.load(Ordering::Relaxed) {
        match pubsub.get_message() {
            Ok(_) => wake(),
            Err(err) if err.is_timeout() => {}
            Err(err) => return Err(failed(err)),
        }
    }
    Ok(())
}
