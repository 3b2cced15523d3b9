//! A real `canhazgpu web` process on 127.0.0.1 with a port the kernel picks, and a
//! minimal HTTP/1.1 client for it (one request per connection).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use super::cli::CliEnv;

const START_TIMEOUT: Duration = Duration::from_secs(20);
const IO_TIMEOUT: Duration = Duration::from_secs(20);

pub struct WebServer {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    stderr_path: PathBuf,
}

impl WebServer {
    /// Starts `canhazgpu web` in `env`, sharing each snapshot for `cache_seconds`,
    /// and waits until it listens.
    pub fn start(env: &CliEnv, cache_seconds: u32) -> Self {
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let stderr_path = env.dir.path().join(format!(
            "web-{}.stderr",
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        let stderr = File::create(&stderr_path).expect("create stderr file");
        let cache = cache_seconds.to_string();
        let mut child = env
            .command([
                "web",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--cache-seconds",
                &cache,
            ])
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start canhazgpu web");
        let stdout = child.stdout.take().expect("piped stdout");
        let (lines, first) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let mut server = WebServer {
            child,
            addr: String::new(),
            stderr_path,
        };
        let line = first.recv_timeout(START_TIMEOUT).unwrap_or_else(|_| {
            panic!(
                "canhazgpu web did not start: {}",
                std::fs::read_to_string(&server.stderr_path).unwrap_or_default()
            )
        });
        let url = line
            .strip_prefix("Serving the GPU dashboard on http://")
            .unwrap_or_else(|| panic!("unexpected first line: {line}"));
        server.addr = url.to_string();
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        request(&self.addr, "GET", path)
    }

    /// `GET path`, parsed as JSON; panics unless the status is `status`.
    #[track_caller]
    pub fn get_json(&self, path: &str, status: u16) -> Value {
        let response = self.get(path);
        assert_eq!(response.status, status, "GET {path}: {response:?}");
        assert_eq!(
            response.header("content-type"),
            Some("application/json"),
            "GET {path}"
        );
        response.json()
    }

    /// How many GPU snapshots the server has taken, from `/healthz`.
    pub fn snapshots(&self) -> u64 {
        self.get("/healthz").json()["gpu_snapshots"]
            .as_u64()
            .expect("gpu_snapshots in /healthz")
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signal canhazgpu web");
    }

    /// Waits for the server to exit by itself; `None` if it did not within `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait for canhazgpu web") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            if self.wait(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One request on a fresh connection (`Connection: close`), read to the end.
pub fn request(addr: &str, method: &str, path: &str) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).expect("connect to canhazgpu web");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed response: {text}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("malformed status line: {head}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    assert!(
        !headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")),
        "this client does not decode chunked bodies"
    );
    HttpResponse {
        status,
        headers,
        body: body.to_string(),
    }
}
