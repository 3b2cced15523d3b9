//! `canhazgpu web` through a real server process on 127.0.0.1: the JSON API against
//! the CLI's output, errors, the shared GPU snapshot, store outages and shutdown, and
//! the fleet's APIs on a real Redis with three hosts.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::support::cli::{CliEnv, wait_until};
use crate::support::fake_smi::FakeSmi;
use crate::support::fleet::Fleet;
use crate::support::history::{HOUR, History, now};
use crate::support::redis::TestRedis;
use crate::support::web::{WebServer, request};
use crate::support::{backend_matrix, cli_env};

backend_matrix! {
    api_serves_what_the_cli_prints => |backend| {
        let (env, _guard) = cli_env(backend);
        api_case(&env);
    },
    bad_requests_get_json_errors => |backend| {
        let (env, _guard) = cli_env(backend);
        bad_requests_case(&env);
    },
    stops_cleanly_on_sigint_and_sigterm => |backend| {
        let (env, _guard) = cli_env(backend);
        shutdown_case(&env);
    },
}

/// Retries until `fetch` gives the same value twice in a row from the API and the CLI:
/// both show durations that tick every second.
#[track_caller]
fn assert_same_as_cli(api: impl Fn() -> Value, cli: impl Fn() -> Value) {
    let mut last = (Value::Null, Value::Null);
    for _ in 0..20 {
        last = (api(), cli());
        if last.0 == last.1 {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("API and CLI differ:\n{}\n{}", last.0, last.1);
}

fn cli_json(env: &CliEnv, args: &[&str]) -> Value {
    let run = env.run(args);
    run.assert_ok();
    serde_json::from_str(&run.stdout).unwrap()
}

fn api_case(env: &CliEnv) {
    env.init_fake(4);
    env.run(["reserve", "--gpu-ids", "1", "--duration", "2h"])
        .assert_ok();
    let t = now();
    History::open(env).finished(
        "bob",
        2,
        canhazgpu::state::ReservationKind::Run,
        t - 3 * HOUR,
        t - HOUR,
    );
    let server = WebServer::start(env, 1);

    assert_same_as_cli(
        || server.get_json("/api/status", 200),
        || cli_json(env, &["status", "--json"]),
    );
    let status = server.get_json("/api/status", 200);
    assert_eq!(status.as_array().unwrap().len(), 4);
    assert_eq!(status[1]["status"], "IN_USE");

    assert_same_as_cli(
        || server.get_json("/api/report?days=7", 200),
        || cli_json(env, &["report", "--json", "--days", "7"]),
    );
    let report = server.get_json("/api/report", 200);
    assert_eq!(report["days"], 30);
    assert_eq!(report["users"][0]["name"], "bob");
    assert_eq!(report["users"][0]["gpu_hours"], 2.0);

    let health = server.get_json("/healthz", 200);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["store"], "ok");

    let page = server.get("/");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(
        page.body
            .contains(r#"<script src="/app.js" defer></script>"#)
    );
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let script = server.get("/app.js");
    assert_eq!(script.status, 200);
    assert!(script.body.contains("textContent"));
    assert!(!script.body.contains("innerHTML") && !script.body.contains("insertAdjacentHTML"));
    assert_eq!(server.get("/style.css").status, 200);
    assert!(server.get("/README.md").body.starts_with("# canhazgpu"));
    let info = server.get_json("/api/info", 200);
    assert!(!info["hostname"].as_str().unwrap().is_empty());
    assert_eq!(server.get_json("/nope", 404)["error"], "not found");
    assert_eq!(request(&server.addr, "POST", "/api/status").status, 405);
}

fn bad_requests_case(env: &CliEnv) {
    env.init_fake(1);
    let server = WebServer::start(env, 1);
    for bad in ["0", "-1", "abc", "1.5", "", "36501", "7%20"] {
        let error = server.get_json(&format!("/api/report?days={bad}"), 400);
        let message = error["error"].as_str().unwrap();
        assert!(
            message.contains("whole number from 1 to 36500"),
            "{bad}: {message}"
        );
    }
    let twice = server.get_json("/api/report?days=1&days=2", 400);
    assert_eq!(twice["error"], "'days' is given more than once");
    // Unknown parameters are ignored, and `host` must name a host: none reaches a
    // shell or another host.
    let marker = env.dir.path().join("marker");
    let path = format!(
        "/api/report?days=3&remote=-oProxyCommand%3Dtouch%20{}",
        marker.display()
    );
    assert_eq!(server.get_json(&path, 200)["days"], 3);
    for api in ["/api/report", "/api/queue", "/api/hosts/status"] {
        let path = format!("{api}?host=%24%28touch%20{}%29", marker.display());
        let error = server.get_json(&path, 400);
        assert!(
            error["error"]
                .as_str()
                .unwrap()
                .starts_with("'host' must be a host name"),
            "{api}: {error}"
        );
        let error = server.get_json(&format!("{api}?host=-oProxyCommand=x"), 400);
        assert!(error["error"].is_string(), "{api}");
        let error = server.get_json(&format!("{api}?host=a&host=b"), 400);
        assert_eq!(error["error"], "'host' is given more than once", "{api}");
    }
    assert!(!marker.exists());
}

fn shutdown_case(env: &CliEnv) {
    env.init_fake(1);
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        let mut server = WebServer::start(env, 1);
        server.get_json("/api/status", 200);
        // A client that never finishes its request must not keep the server up.
        let mut half_sent = std::net::TcpStream::connect(&server.addr).unwrap();
        std::io::Write::write_all(&mut half_sent, b"GET /healthz HTTP/1.1\r\n").unwrap();
        server.signal(signal);
        let status = server
            .wait(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("still running 10 s after {signal}"));
        assert!(status.success(), "{signal}: {status:?} {}", server.stderr());
        assert!(
            server.stderr().contains("Web server stopped"),
            "{}",
            server.stderr()
        );
    }
}

#[test]
fn concurrent_viewers_share_one_gpu_snapshot() {
    let mut env = CliEnv::sqlite();
    let smi = FakeSmi::nvidia(env.dir.path(), 2);
    env.path_prefix.push(smi.path_dir());
    env.run(["admin", "--gpus", "2"]).assert_ok();
    let server = WebServer::start(&env, 30);
    let calls_before = smi.invocations();

    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..64)
            .map(|_| scope.spawn(|| request(&server.addr, "GET", "/api/status").status))
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(server.snapshots(), 1);
    // One snapshot queries nvidia-smi at most twice (GPUs, then processes).
    let calls = smi.invocations() - calls_before;
    assert!((1..=2).contains(&calls), "{calls} nvidia-smi calls");
    for _ in 0..20 {
        server.get_json("/api/status", 200);
    }
    assert_eq!(server.snapshots(), 1);
    assert_eq!(smi.invocations() - calls_before, calls);
}

#[test]
fn snapshots_are_renewed_after_the_cache_interval() {
    let env = CliEnv::sqlite();
    env.init_fake(2);
    let server = WebServer::start(&env, 1);
    server.get_json("/api/status", 200);
    assert_eq!(server.snapshots(), 1);
    env.run(["reserve", "--gpu-ids", "0"]).assert_ok();
    std::thread::sleep(Duration::from_millis(1100));
    let status = server.get_json("/api/status", 200);
    assert_eq!(
        status[0]["status"], "IN_USE",
        "a new snapshot shows the reservation"
    );
    assert_eq!(server.snapshots(), 2);
}

#[test]
fn store_outage_is_a_503_until_the_store_is_back() {
    let mut redis = TestRedis::launch();
    let env = CliEnv::redis(&redis.url());
    env.init_fake(2);
    let server = WebServer::start(&env, 1);
    server.get_json("/api/status", 200);

    redis.stop();
    std::thread::sleep(Duration::from_millis(1100));
    let status = server.get_json("/api/status", 503);
    assert!(
        status["error"].as_str().unwrap().contains("Redis"),
        "{status}"
    );
    let report = server.get_json("/api/report?days=1", 503);
    assert!(report["error"].is_string());
    let health = server.get_json("/healthz", 503);
    assert_eq!(health["status"], "degraded");
    // The page itself is static and still served, to say what is wrong.
    assert_eq!(server.get("/").status, 200);

    // A restarted server is empty: the pool must be set up again, and then it serves.
    redis.start();
    env.init_fake(2);
    std::thread::sleep(Duration::from_millis(1100));
    let status = server.get_json("/api/status", 200);
    assert_eq!(status.as_array().unwrap().len(), 2);
    assert_eq!(server.get_json("/healthz", 200)["store"], "ok");
    server.get_json("/api/report?days=1", 200);
}

#[test]
fn a_host_that_cannot_be_used_is_a_usage_error() {
    let env = CliEnv::sqlite();
    env.init_fake(1);
    let run = env.run(["web", "--host", "", "--port", "0"]);
    run.assert_code(2);
    assert!(
        run.stderr.starts_with("Error: --host: cannot use ''"),
        "{run:?}"
    );
}

/// Clients that never finish their request: `/healthz` stays fast meanwhile, and
/// the server closes every such connection after its header-read timeout.
#[test]
fn half_open_connections_are_closed_and_do_not_block_others() {
    use std::io::{Read, Write};
    const CLIENTS: usize = 1000;
    let env = CliEnv::sqlite();
    env.init_fake(2);
    let server = WebServer::start(&env, 1);
    let mut stalled: Vec<std::net::TcpStream> = (0..CLIENTS)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
            stream
                .write_all(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            stream
        })
        .collect();
    let started = std::time::Instant::now();
    let health = server.get("/healthz");
    assert_eq!(health.status, 200, "{health:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    // All closed by the server within its 10 s timeout (and some slack).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for stream in &mut stalled {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        stream
            .set_read_timeout(Some(left.max(std::time::Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 512];
        let closed = loop {
            match stream.read(&mut buf) {
                Ok(0) => break true,
                // hyper may answer 408 before closing.
                Ok(_) => continue,
                Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(_) => break false,
            }
        };
        assert!(closed, "a half-open connection was still open after 20 s");
    }
    assert!(started.elapsed() >= std::time::Duration::from_secs(9));
    assert_eq!(server.get("/healthz").status, 200);
}

/// Hosts a (running the server), b (a reservation) and c (stale), on one Redis, and a
/// `remote_hosts` entry that is not in it (read over SSH, which fails).
fn fleet_of_three(fleet: &Fleet) -> CliEnv {
    let mut a = fleet.host_with("a", 2);
    let b = fleet.host_with("b", 3);
    fleet.host_with("c", 1);
    b.run(["reserve", "--gpu-ids", "1", "-d", "1h"]).assert_ok();
    b.run(["status"]).assert_ok();
    fleet.age_snapshot("c", 303);
    a.set_var("CANHAZGPU_REMOTE_HOSTS", "nosuchhost.invalid");
    a
}

#[test]
fn fleet_apis_show_every_host_and_refuse_unknown_ones() {
    let fleet = Fleet::launch();
    let a = fleet_of_three(&fleet);
    let server = WebServer::start(&a, 1);

    let hosts = server.get_json("/api/hosts", 200);
    let names: Vec<&str> = hosts
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "nosuchhost.invalid", "b", "c"]);
    assert_eq!(hosts[0]["is_local"], true);
    assert_eq!(hosts[0]["source"], "redis");
    assert_eq!(hosts[1]["source"], "ssh");
    assert_eq!(hosts[1]["reported_at"], Value::Null);
    assert_eq!(hosts[2]["stale"], false);
    assert_eq!(hosts[3]["stale"], true);
    assert_eq!(hosts[3]["is_local"], false);
    let c_reported = hosts[3]["reported_at"].as_i64().unwrap();
    assert!((now() - 303 - c_reported).abs() <= 5, "{c_reported}");

    let all = server.get_json("/api/hosts/status", 200);
    assert_eq!(all.as_array().unwrap().len(), 4);
    let b = &all[2];
    assert_eq!(b["host"], "b");
    assert_eq!(
        b["summary"],
        serde_json::json!({"total": 3, "available": 2, "in_use": 1, "gpu_models": "3 Fake GPU"})
    );
    assert_eq!(b["statuses"][1]["status"], "IN_USE");
    assert_eq!(b["error"], Value::Null);
    let c = &all[3];
    assert_eq!(c["stale"], true);
    assert_eq!(c["summary"]["available"], 0, "a stale host offers nothing");
    assert!(
        c["statuses"][0]["validation"]
            .as_str()
            .unwrap()
            .starts_with("host not reporting for 0h 5m"),
        "{c}"
    );
    let unreachable = &all[1];
    assert!(unreachable["error"].is_string(), "{unreachable}");
    assert_eq!(unreachable["statuses"], serde_json::json!([]));
    // The same figures as `status --all --summary --json`.
    let cli = cli_json(&a, &["status", "--all", "--summary", "--json"]);
    for (api, cli) in all.as_array().unwrap().iter().zip(cli.as_array().unwrap()) {
        assert_eq!(api["host"], cli["host"]);
        assert_eq!(api["stale"], cli["stale"]);
        if api["error"].is_null() {
            for key in ["total", "available", "in_use", "gpu_models"] {
                assert_eq!(api["summary"][key], cli[key], "{key} of {}", api["host"]);
            }
        }
    }

    let one = server.get_json("/api/hosts/status?host=b", 200);
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(one[0]["host"], "b");
    assert_eq!(one[0]["summary"]["in_use"], 1);
    let unknown = server.get_json("/api/hosts/status?host=zz", 404);
    assert_eq!(
        unknown["error"],
        "unknown host 'zz' (known hosts: a, nosuchhost.invalid, b, c)"
    );

    assert_same_as_cli(
        || server.get_json("/api/queue?host=b", 200),
        || cli_json(&a, &["queue", "--host", "b", "--json"]),
    );
    // Only hosts in the store have a queue and a report.
    for path in [
        "/api/queue?host=zz",
        "/api/queue?host=nosuchhost.invalid",
        "/api/report?host=zz",
    ] {
        let error = server.get_json(path, 404);
        assert!(
            error["error"]
                .as_str()
                .unwrap()
                .ends_with("(known hosts: a, b, c)"),
            "{path}: {error}"
        );
    }
    assert_same_as_cli(
        || server.get_json("/api/report?days=7&host=b", 200),
        || cli_json(&a, &["report", "--json", "--days", "7", "--host", "b"]),
    );
    assert_same_as_cli(
        || server.get_json("/api/report?days=7&host=all", 200),
        || cli_json(&a, &["report", "--json", "--days", "7", "--all"]),
    );
    let report = server.get_json("/api/report?host=all", 200);
    assert_eq!(report["hosts"].as_array().unwrap().len(), 3);
    assert_eq!(report["total_reservations"], 1);
    server.get_json("/api/report?days=0&host=all", 400);
    // This host's own views are unchanged by the fleet.
    assert_eq!(
        server
            .get_json("/api/status", 200)
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(server.get_json("/api/report", 200).get("hosts").is_none());
}

#[test]
fn web_keeps_its_hosts_snapshot_fresh() {
    let fleet = Fleet::launch();
    let a = fleet.host_with("a", 2);
    fleet.age_snapshot("a", 3600);
    let server = WebServer::start(&a, 1);
    // It registers its interval (the snapshot interval, here 1 s) and keeps publishing.
    let registered = || fleet.redis(&["HGET", "canhazgpu:hosts", "a"]) == r#"{"interval_secs":1}"#;
    assert!(
        wait_until(Duration::from_secs(5), registered),
        "{}",
        server.stderr()
    );
    let reported = || {
        fleet
            .redis(&["HGET", "canhazgpu:hosts:reported", "a"])
            .as_str()
            .and_then(|at| at.parse::<i64>().ok())
    };
    let first = reported().unwrap();
    assert!((now() - first).abs() <= 2, "{first}");
    assert!(
        wait_until(Duration::from_secs(5), || reported().unwrap() > first),
        "published again"
    );
    let hosts = server.get_json("/api/hosts", 200);
    assert_eq!(hosts[0]["stale"], false);
}

#[test]
fn concurrent_fleet_viewers_share_one_read() {
    let fleet = Fleet::launch();
    let a = fleet_of_three(&fleet);
    let server = WebServer::start(&a, 30);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..64)
            .map(|i| {
                let path = [
                    "/api/hosts/status",
                    "/api/hosts",
                    "/api/hosts/status?host=c",
                ][i % 3];
                let server = &server;
                scope.spawn(move || request(&server.addr, "GET", path).status)
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let reads = || {
        server.get_json("/healthz", 200)["fleet_reads"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(reads(), 1);
    for _ in 0..20 {
        server.get_json("/api/hosts/status", 200);
    }
    server.get_json("/api/hosts/status?host=zz", 404);
    assert_eq!(reads(), 1);
}
