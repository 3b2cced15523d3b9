//! A private `redis-server` per test, on a Unix socket in a temporary directory.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use canhazgpu::store::redis::RedisStore;
use canhazgpu::store::{RedisConfig, RedisLayout, SentinelConfig};
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
            password_file: None,
            system: false,
            tls: Default::default(),
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

/// The name the sentinels know the master by (canhazgpu's default).
const MASTER_NAME: &str = "mymaster";

/// A master and one replica (TCP, loopback) watched by three sentinels with a quorum
/// of 2, which call the master down after 1 s without an answer.
pub struct TestSentinels {
    pub master: TestRedis,
    pub replica: TestRedis,
    pub replica_port: u16,
    sentinel_ports: Vec<u16>,
    sentinels: Vec<Child>,
    /// Their config files, which they rewrite, and logs.
    dir: TempDir,
}

impl TestSentinels {
    /// Starts all five servers and returns once every sentinel sees the replica and
    /// the other two sentinels, so that a failover can be agreed on.
    pub fn launch() -> Self {
        let master_port = free_port();
        let replica_port = free_port();
        let (master_arg, replica_arg) = (master_port.to_string(), replica_port.to_string());
        let master = TestRedis::launch_with(&["--port", &master_arg, "--bind", "127.0.0.1"]);
        let replica = TestRedis::launch_with(&[
            "--port",
            &replica_arg,
            "--bind",
            "127.0.0.1",
            "--replicaof",
            "127.0.0.1",
            &master_arg,
        ]);
        let mut cluster = TestSentinels {
            master,
            replica,
            replica_port,
            sentinel_ports: Vec::new(),
            sentinels: Vec::new(),
            dir: tempfile::tempdir().expect("create temp dir for the sentinels"),
        };
        for index in 0..3 {
            let port = free_port();
            let dir = cluster.dir.path();
            let config = dir.join(format!("sentinel-{index}.conf"));
            std::fs::write(
                &config,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 5000\n",
                    dir.display(),
                    dir.join(format!("sentinel-{index}.log")).display(),
                ),
            )
            .expect("write a sentinel config file");
            let sentinel = Command::new("redis-server")
                .arg(&config)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server --sentinel");
            cluster.sentinels.push(sentinel);
            cluster.sentinel_ports.push(port);
        }
        let ready = super::cli::wait_until(Duration::from_secs(20), || {
            cluster.sentinel_ports.iter().all(|&port| {
                let master: Option<std::collections::HashMap<String, String>> = sentinel_query(
                    port,
                    ::redis::cmd("SENTINEL").arg("MASTER").arg(MASTER_NAME),
                );
                master.is_some_and(|master| {
                    master.get("num-slaves").map(String::as_str) == Some("1")
                        && master.get("num-other-sentinels").map(String::as_str) == Some("2")
                })
            })
        });
        assert!(
            ready,
            "the sentinels did not find each other: {}",
            cluster.logs()
        );
        cluster
    }

    /// `127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`, for `CANHAZGPU_REDIS_SENTINELS`.
    pub fn addresses(&self) -> String {
        let addresses: Vec<String> = self
            .sentinel_ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        addresses.join(",")
    }

    /// The store's configuration: the master through these sentinels.
    pub fn config(&self) -> RedisConfig {
        RedisConfig {
            url: None,
            sentinel: Some(SentinelConfig {
                nodes: self
                    .sentinel_ports
                    .iter()
                    .map(|&port| ("127.0.0.1".to_string(), port))
                    .collect(),
                master: MASTER_NAME.into(),
            }),
            ..self.master.config_in(RedisLayout::Fleet)
        }
    }

    /// Runs `command` on every sentinel.
    pub fn tell_sentinels(&self, command: &::redis::Cmd) {
        for &port in &self.sentinel_ports {
            let done: Option<::redis::Value> = sentinel_query(port, command);
            assert!(done.is_some(), "sentinel {port} refused {command:?}");
        }
    }

    /// Whether a sentinel already names the replica as the master.
    pub fn replica_promoted(&self) -> bool {
        self.sentinel_ports.iter().any(|&port| {
            let named: Option<(String, u16)> = sentinel_query(
                port,
                ::redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(MASTER_NAME),
            );
            named.is_some_and(|(_, port)| port == self.replica_port)
        })
    }

    /// Returns once the replica holds every write made so far, then keeps what
    /// follows from it: the replica authenticates with a password the master does
    /// not have, so it cannot reconnect after its link is cut.
    pub fn stop_replication(&self) {
        let mut master = self.master.raw();
        let () = ::redis::cmd("SET")
            .arg("test:fence")
            .arg(1)
            .query(&mut master)
            .expect("write the fence");
        let acked: u32 = ::redis::cmd("WAIT")
            .arg(1)
            .arg(5000)
            .query(&mut master)
            .expect("WAIT");
        assert_eq!(acked, 1, "the replica did not catch up");
        let mut replica = self.replica.raw();
        let () = ::redis::cmd("CONFIG")
            .arg("SET")
            .arg("masterauth")
            .arg("not-the-password")
            .query(&mut replica)
            .expect("set masterauth");
        let _: u32 = ::redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("replica")
            .query(&mut master)
            .expect("cut the replication link");
        let down = super::cli::wait_until(Duration::from_secs(5), || {
            let info: String = ::redis::cmd("INFO")
                .arg("replication")
                .query(&mut replica)
                .unwrap_or_default();
            info.contains("master_link_status:down")
        });
        assert!(down, "the replica is still linked to the master");
    }

    /// The sentinels' logs, for failure messages.
    pub fn logs(&self) -> String {
        (0..self.sentinels.len())
            .map(|index| {
                let log = self.dir.path().join(format!("sentinel-{index}.log"));
                std::fs::read_to_string(log).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for TestSentinels {
    fn drop(&mut self) {
        for sentinel in &mut self.sentinels {
            // Only our own children, by PID.
            let _ = sentinel.kill();
            let _ = sentinel.wait();
        }
    }
}

/// A TCP port on loopback that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("find a free port")
        .port()
}

/// One command to the sentinel on `port`; `None` while it does not answer.
fn sentinel_query<T: ::redis::FromRedisValue>(port: u16, command: &::redis::Cmd) -> Option<T> {
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut connection = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .ok()?;
    connection
        .set_read_timeout(Some(Duration::from_secs(1)))
        .ok()?;
    command.query(&mut connection).ok()
}
