//! Prometheus metrics from `web` and `agent --metrics-listen`, checked by value and
//! by `promtool check metrics`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::cli::{CliEnv, terminate, wait_until};
use crate::support::web::{WebServer, request};
use crate::support::{backend_matrix, cli_env};

const HOST: &str = "metricshost";

/// `promtool check metrics` on the text: no errors, no lint findings.
#[track_caller]
fn promtool_accepts(text: &str) {
    crate::support::require("promtool");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample `name{labels}` (labels in the order given).
#[track_caller]
fn sample(text: &str, series: &str) -> f64 {
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// A series with these labels, in whatever order the encoder wrote them.
fn has_series(text: &str, name: &str, labels: &[(&str, &str)]) -> bool {
    text.lines().any(|line| {
        line.strip_prefix(name).is_some_and(|rest| {
            rest.starts_with('{')
                && labels
                    .iter()
                    .all(|(key, value)| rest.contains(&format!("{key}=\"{value}\"")))
        })
    })
}

/// The Grafana dashboard in contrib/ queries only metrics that `text` has.
#[track_caller]
fn dashboard_uses_only(text: &str) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/grafana/canhazgpu-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let exported: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    let mut used = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (start, _) in expr.match_indices("canhazgpu_") {
                let name: String = expr[start..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    exported.contains(&name.as_str()),
                    "{name} in {expr}: {exported:?}"
                );
                used += 1;
            }
        }
    }
    assert!(used >= 10, "the dashboard queries the metrics");
}

backend_matrix! {
    web_serves_the_fleet_as_metrics => |backend| {
        let (mut env, _server) = cli_env(backend);
        env.set_var("CANHAZGPU_HOST_NAME", HOST);
        env.init_fake(4);
        env.run(["reserve", "--gpus", "2"]).assert_ok();
        env.run(["reserve", "--gpus", "3"]).assert_code(3);
        let mut waiter = env
            .command(["reserve", "--gpus", "3", "--wait", "60s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(wait_until(Duration::from_secs(10), || {
            env.run(["queue"]).stdout.contains("1 waiting")
        }));
        let web = WebServer::start(&env, 1);
        let response = web.get("/metrics");
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(
            response.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        let text = response.body;
        promtool_accepts(&text);
        let host = format!("host=\"{HOST}\"");
        // The waiter collects the two free GPUs while it waits for a third.
        assert_eq!(sample(&text, &format!("canhazgpu_gpus{{{host},status=\"in_use\"}}")), 4.0);
        assert_eq!(sample(&text, &format!("canhazgpu_gpus{{{host},status=\"available\"}}")), 0.0);
        assert_eq!(sample(&text, &format!("canhazgpu_gpus{{{host},status=\"unreserved\"}}")), 0.0);
        assert_eq!(sample(&text, &format!("canhazgpu_queue_length{{{host}}}")), 1.0);
        assert!(sample(&text, &format!("canhazgpu_queue_oldest_wait_seconds{{{host}}}")) >= 0.0);
        assert_eq!(sample(&text, &format!("canhazgpu_allocations_total{{{host}}}")), 1.0);
        // The refused request and the waiter's own first try.
        assert_eq!(sample(&text, &format!("canhazgpu_allocation_failures_total{{{host}}}")), 2.0);
        let user = env.status_json()[0]["user"].as_str().unwrap().to_owned();
        for gpu in ["0", "1"] {
            assert!(
                has_series(&text, "canhazgpu_gpu_reserved", &[("host", HOST), ("gpu", gpu), ("user", &user), ("type", "manual")]),
                "{text}"
            );
        }
        let reserved = text.lines().filter(|line| line.starts_with("canhazgpu_gpu_reserved{")).count();
        assert_eq!(reserved, 4, "{text}");
        for gpu in ["0", "1", "2", "3"] {
            assert!(has_series(&text, "canhazgpu_gpu_memory_used_bytes", &[("host", HOST), ("gpu", gpu)]), "{text}");
            assert!(has_series(&text, "canhazgpu_gpu_utilization_ratio", &[("host", HOST), ("gpu", gpu)]), "{text}");
        }
        terminate(&mut waiter);
        env.run(["release"]).assert_ok();
        // Counters count on; the queue empties.
        env.run(["reserve", "--gpus", "4"]).assert_ok();
        // The web server shares a fleet read for a second.
        std::thread::sleep(Duration::from_millis(1100));
        let text = web.get("/metrics").body;
        assert_eq!(sample(&text, &format!("canhazgpu_allocations_total{{{host}}}")), 2.0);
        assert_eq!(sample(&text, &format!("canhazgpu_queue_length{{{host}}}")), 0.0);
        assert_eq!(sample(&text, &format!("canhazgpu_gpus{{{host},status=\"in_use\"}}")), 4.0);
    },
}

#[test]
fn the_agent_serves_metrics_with_snapshot_ages() {
    let server = crate::support::redis::TestRedis::launch();
    let mut env = CliEnv::redis(&server.url());
    env.set_var("CANHAZGPU_HOST_NAME", HOST);
    env.init_fake(2);
    env.run(["reserve"]).assert_ok();
    let port = crate::support::redis::free_port();
    let address = format!("127.0.0.1:{port}");
    let mut agent = env
        .command(["agent", "--interval", "1s", "--metrics-listen", &address])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut text = String::new();
    assert!(wait_until(Duration::from_secs(10), || {
        if std::net::TcpStream::connect(&address).is_err() {
            return false;
        }
        text = request(&address, "GET", "/metrics").body;
        text.contains("canhazgpu_snapshot_age_seconds")
    }));
    promtool_accepts(&text);
    dashboard_uses_only(&text);
    let host = format!("host=\"{HOST}\"");
    assert!(sample(&text, &format!("canhazgpu_snapshot_age_seconds{{{host}}}")) <= 3.0);
    assert_eq!(
        sample(&text, &format!("canhazgpu_host_reporting{{{host}}}")),
        1.0
    );
    assert_eq!(request(&address, "GET", "/nothing").status, 404);
    terminate(&mut agent);

    // Three intervals later the host is not reporting, and the metrics say so (from
    // a web server on another host: one on this host publishes this host's snapshot).
    let mut elsewhere = CliEnv::redis(&server.url());
    elsewhere.set_var("CANHAZGPU_HOST_NAME", "watcher");
    let web = WebServer::start(&elsewhere, 1);
    assert!(wait_until(Duration::from_secs(10), || {
        let text = web.get("/metrics").body;
        text.contains(&format!("canhazgpu_host_reporting{{{host}}} 0"))
    }));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let refused = env.run(["agent", "--metrics-listen", &busy]);
    refused.assert_code(2);
    assert_eq!(refused.stderr.lines().count(), 1, "{refused:?}");
    assert!(
        refused
            .stderr
            .starts_with(&format!("Error: cannot listen on {busy}")),
        "{refused:?}"
    );
}
