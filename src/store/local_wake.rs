//! Wake-ups between the processes of one host: a waiter binds a Unix datagram socket
//! in the abstract namespace, named after its store and queue entry, and a change
//! that concerns the entry sends it one byte. No file and no permission is involved
//! and nothing is left behind when the waiter dies. It is a hint only: a missed one
//! (another network namespace, say) is covered by the waiter's periodic turn.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::Wake;

/// A short, stable name for a store (its path), so that two stores on one host never
/// wake each other's waiters.
pub fn scope_of(text: &str) -> String {
    // FNV-1a: an abstract name has at most 107 bytes, a path may be longer.
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

fn address(scope: &str, entry_id: &str) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("canhazgpu/{scope}/{entry_id}"))
}

/// Wakes the waiters of `entry_ids`, if they listen; never blocks.
pub fn notify(scope: &str, entry_ids: &[String]) {
    if entry_ids.is_empty() {
        return;
    }
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    let _ = socket.set_nonblocking(true);
    for entry_id in entry_ids {
        if let Ok(address) = address(scope, entry_id) {
            let _ = socket.send_to_addr(&[1], &address);
        }
    }
}

/// Listens for the wake-ups of one entry in a thread of its own, until dropped.
pub struct Listener {
    scope: String,
    entry_id: String,
    stop: Arc<AtomicBool>,
}

impl Listener {
    pub fn start(scope: &str, entry_id: &str, wake: Wake) -> io::Result<Listener> {
        let socket = UnixDatagram::bind_addr(&address(scope, entry_id)?)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("queue-wake".into())
            .spawn(move || {
                let mut byte = [0u8; 1];
                while socket.recv(&mut byte).is_ok() && !stopped.load(Ordering::SeqCst) {
                    wake();
                }
            })?;
        Ok(Listener {
            scope: scope.to_string(),
            entry_id: entry_id.to_string(),
            stop,
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // The thread blocks in `recv`: one more datagram lets it see the flag.
        self.stop.store(true, Ordering::SeqCst);
        notify(&self.scope, std::slice::from_ref(&self.entry_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_notified_entry_wakes_and_others_do_not() {
        let scope = scope_of(&format!("/tmp/test-{}", std::process::id()));
        let (woken, wakes) = mpsc::channel();
        let sender = std::sync::Mutex::new(woken);
        let listener = Listener::start(
            &scope,
            "entry-a",
            Arc::new(move || {
                let _ = sender.lock().unwrap().send(());
            }),
        )
        .unwrap();
        notify(&scope, &["entry-b".to_string()]);
        assert!(wakes.recv_timeout(Duration::from_millis(100)).is_err());
        notify(&scope, &["entry-a".to_string()]);
        assert!(wakes.recv_timeout(Duration::from_secs(2)).is_ok());
        drop(listener);
        // The name is free again once the listener is gone.
        std::thread::sleep(Duration::from_millis(50));
        let again = Listener::start(&scope, "entry-a", Arc::new(|| {}));
        assert!(again.is_ok());
    }
}
