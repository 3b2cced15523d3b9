//! `canhazgpu web`: serves the dashboard until SIGINT or SIGTERM.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::commands::agent::Agent;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::fleet::DEFAULT_INTERVAL_SECS;
use crate::output;
use crate::session::Session;
use crate::store::{RedisLayout, StoreConfig};
use crate::web::{self, ServeOptions};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebArgs {
    pub host: String,
    pub port: u16,
    /// How long one GPU snapshot is shared between requests.
    pub cache_seconds: u64,
}

pub fn execute(args: &WebArgs, config: &Config) -> Result<()> {
    if args.cache_seconds == 0 {
        return Err(Error::Usage("--cache-seconds must be at least 1".into()));
    }
    if let Err(e) = Session::open(config) {
        eprintln!("warning: {e}; the dashboard reports this until it is fixed");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Runtime(format!("cannot start the web server: {e}")))?;
    runtime.block_on(async {
        // `[::1]` as in URLs means `::1`.
        let host = args.host.trim_start_matches('[').trim_end_matches(']');
        // A host that does not resolve is a bad value (exit 2); failing to listen on
        // a good one (port taken, no permission) is a runtime failure.
        let addresses: Vec<_> = tokio::net::lookup_host((host, args.port))
            .await
            .map_err(|e| Error::Usage(format!("--host: cannot use '{}': {e}", args.host)))?
            .collect();
        let listener = TcpListener::bind(addresses.as_slice()).await.map_err(|e| {
            Error::Runtime(format!("cannot listen on {}:{}: {e}", args.host, args.port))
        })?;
        let address = listener
            .local_addr()
            .map_err(|e| Error::Runtime(format!("cannot read the listening address: {e}")))?;
        output::print(&format!("Serving the GPU dashboard on http://{address}"))?;
        let shutdown = shutdown_signal()?;
        // Where other hosts read this one's snapshot, keep it fresh as `agent` does.
        if matches!(&config.store, StoreConfig::Redis(redis) if redis.layout == RedisLayout::Fleet)
        {
            let interval = args.cache_seconds.min(DEFAULT_INTERVAL_SECS);
            let config = config.clone();
            std::thread::Builder::new()
                .name("canhazgpu-web-publish".into())
                .spawn(move || publish_snapshots(&config, interval))
                .map_err(|e| Error::Runtime(format!("cannot start the publishing thread: {e}")))?;
        }
        let options = ServeOptions {
            snapshot_interval: Duration::from_secs(args.cache_seconds),
        };
        web::serve(listener, config.clone(), options, shutdown).await
    })?;
    eprintln!("Web server stopped");
    Ok(())
}

/// Publishes this host's snapshot every `interval_secs` until the process ends.
/// Without a pool yet (or a store), it retries each interval.
fn publish_snapshots(config: &Config, interval_secs: u64) {
    const WHO: &str = "canhazgpu web";
    let mut agent: Option<Agent> = None;
    let mut failing: Option<String> = None;
    loop {
        if agent.is_none() {
            match Agent::start(config, interval_secs, WHO) {
                Ok(started) => agent = Some(started),
                Err(err) => {
                    let message = err.to_string();
                    if failing.as_ref() != Some(&message) {
                        eprintln!("{WHO}: cannot publish this host's GPUs: {message}");
                    }
                    failing = Some(message);
                }
            }
        }
        if let Some(agent) = &mut agent {
            agent.publish(config);
        }
        std::thread::sleep(Duration::from_secs(interval_secs));
    }
}

/// Completes on the first SIGINT or SIGTERM.
fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static> {
    let signal_error = |e| Error::Runtime(format!("cannot handle signals: {e}"));
    let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_error)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(signal_error)?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}
