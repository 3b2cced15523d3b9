//! A private `redis-server` per test, on a Unix socket in a temporary directory.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use canhazgpu::store::redis::RedisStore;
use canhazgpu::store::{RedisConfig, RedisLayout};
use tempfile::TempDir;

use super::StoreFixture;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestRedis {
    dir: TempDir,
    extra_args: Vec<String>,
    server: Option<Child>,
}

impl TestRedis {
    pub fn launch() -> Self {
        Self::launch_with(&[])
    }

    /// Launches a server with extra `redis-server` arguments (e.g. `--requirepass`).
    pub fn launch_with(extra_args: &[&str]) -> Self {
        let mut redis = TestRedis {
            dir: tempfile::tempdir().expect("create temp dir for redis-server"),
            extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
            server: None,
        };
        redis.start();
        redis
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("r.sock")
    }

    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    /// Upstream canhazgpu's layout, whose keys the tests write directly.
    pub fn config(&self) -> RedisConfig {
        self.config_in(RedisLayout::Upstream)
    }

    pub fn config_in(&self, layout: RedisLayout) -> RedisConfig {
        RedisConfig {
            url: Some(self.url()),
            host: "localhost".into(),
            port: 6379,
            db: 0,
            password: None,
            layout,
            sentinel: None,
        }
    }

    /// A raw connection, for writing data the way other tools would.
    pub fn raw(&self) -> ::redis::Connection {
        ::redis::Client::open(self.url().as_str())
            .and_then(|client| client.get_connection())
            .expect("connect to test redis-server")
    }

    /// Stops (`SIGSTOP`) or continues (`SIGCONT`) the server process, by its PID.
    pub fn freeze(&self, frozen: bool) {
        let server = self.server.as_ref().expect("redis-server is running");
        let pid = nix::unistd::Pid::from_raw(server.id() as i32);
        let signal = match frozen {
            true => nix::sys::signal::Signal::SIGSTOP,
            false => nix::sys::signal::Signal::SIGCONT,
        };
        nix::sys::signal::kill(pid, signal).expect("signal redis-server");
    }

    /// Kills the server; it loses all data (nothing is persisted).
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            // Only our own child, by PID.
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    /// Starts the server (again, after `stop`) on the same socket, empty.
    pub fn start(&mut self) {
        assert!(self.server.is_none(), "redis-server is already running");
        super::require("redis-server");
        let log = self.dir.path().join("redis.log");
        let mut server = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(self.socket())
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.try_wait() {
                panic!(
                    "redis-server exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if self.answers_ping() {
                break;
            }
            if Instant::now() > deadline {
                let _ = server.kill();
                let _ = server.wait();
                panic!("redis-server did not answer PING within {STARTUP_TIMEOUT:?}");
            }
            sleep(Duration::from_millis(10));
        }
        self.server = Some(server);
    }

    fn answers_ping(&self) -> bool {
        let Ok(mut stream) = UnixStream::connect(self.socket()) else {
            return false;
        };
        // Any reply (PONG, or NOAUTH with --requirepass) means the server is up.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 1];
        stream.write_all(b"PING\r\n").is_ok() && stream.read(&mut reply).is_ok_and(|n| n == 1)
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The Redis backend for the store conformance suite.
pub fn redis_store_fixture(layout: RedisLayout) -> StoreFixture {
    let server = TestRedis::launch();
    let config = server.config_in(layout);
    StoreFixture {
        guard: Box::new(server),
        open: Box::new(move || {
            Box::new(RedisStore::connect(&config).expect("connect to test redis-server"))
        }),
    }
}
