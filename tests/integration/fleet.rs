//! Several hosts on one Redis, through the real binary: each host's own pool, the
//! fleet views (`status --all/--remote/--summary`, `find`, `report --all`), acting on
//! another host (`--host`), the agent, staleness and removing a host.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::multi_user::ensure_user;
use crate::support::cli::{BIN, CliEnv, Run, terminate, wait_until};
use crate::support::fleet::Fleet;
use crate::support::history::now;

fn json(run: &Run) -> Value {
    run.assert_ok();
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {run:?}"))
}

#[test]
fn each_host_has_its_own_pool_in_one_redis() {
    let fleet = Fleet::launch();
    let a = fleet.host_with("gpu-a", 4);
    let b = fleet.host_with("gpu-b", 8);
    assert_eq!(a.statuses().len(), 4);
    assert_eq!(b.statuses().len(), 8);
    a.run(["reserve", "--gpu-ids", "0"]).assert_ok();
    assert_eq!(a.statuses()[0], "IN_USE");
    assert_eq!(b.statuses()[0], "AVAILABLE", "host b's GPU 0 is its own");

    // The layout the README documents: one hash tag per host, and a registry.
    assert_eq!(fleet.redis(&["GET", "canhazgpu:{gpu-a}:gpu_count"]), "4");
    assert_eq!(fleet.redis(&["GET", "canhazgpu:{gpu-b}:gpu_count"]), "8");
    let mut hosts: Vec<String> =
        serde_json::from_value(fleet.redis(&["HKEYS", "canhazgpu:hosts"])).unwrap();
    hosts.sort();
    assert_eq!(hosts, ["gpu-a", "gpu-b"]);
    assert_eq!(fleet.redis(&["EXISTS", "canhazgpu:gpu_count"]), 0);
}

#[test]
fn an_upstream_pool_in_the_same_database_is_pointed_out() {
    let fleet = Fleet::launch();
    let upstream = CliEnv::redis_upstream(&fleet.server.url());
    upstream.init_fake(2);
    let run = fleet.host("gpu-a").run(["status"]);
    run.assert_code(4);
    assert!(
        run.stderr.contains("holds an upstream canhazgpu pool")
            && run
                .stderr
                .contains("redis.layout: upstream (CANHAZGPU_REDIS_LAYOUT=upstream)"),
        "{run:?}"
    );
    assert_eq!(upstream.statuses().len(), 2);
}

/// Hosts a (this one), b (reporting) and c (stale), and `remote_hosts` naming c and
/// a host that is not in Redis.
fn three_hosts(fleet: &Fleet) -> (CliEnv, CliEnv, CliEnv) {
    let mut a = fleet.host_with("a", 2);
    let b = fleet.host_with("b", 3);
    let c = fleet.host_with("c", 1);
    b.run(["reserve", "--gpu-ids", "1", "-d", "1h"]).assert_ok();
    b.run(["status"]).assert_ok();
    fleet.age_snapshot("c", 303);
    a.set_var("CANHAZGPU_REMOTE_HOSTS", "c,nosuchhost.invalid");
    (a, b, c)
}

#[test]
fn status_all_shows_every_host_in_order_with_a_stale_one_and_an_unreachable_one() {
    let fleet = Fleet::launch();
    let (a, _b, _c) = three_hosts(&fleet);
    let run = a.run(["status", "--all"]);
    run.assert_ok();
    let titles: Vec<&str> = run
        .stdout
        .lines()
        .filter(|line| line.starts_with("┌─ "))
        .collect();
    assert_eq!(
        titles,
        ["┌─ a ─┐", "┌─ c ─┐", "┌─ nosuchhost.invalid ─┐", "┌─ b ─┐"]
    );
    assert!(run.stdout.starts_with("\n┌─ a ─┐\nGPU"), "{}", run.stdout);
    let c_block: Vec<&str> = run
        .stdout
        .split("┌─ c ─┐")
        .nth(1)
        .unwrap()
        .lines()
        .take(4)
        .collect();
    assert!(
        c_block[3].ends_with("host not reporting for 0h 5m 3s")
            || c_block[3].contains("host not reporting for 0h 5m"),
        "{c_block:?}"
    );
    let unreachable = run
        .stdout
        .split("┌─ nosuchhost.invalid ─┐\n")
        .nth(1)
        .unwrap();
    assert!(unreachable.starts_with("│ ERROR: "), "{unreachable}");
    assert!(unreachable.lines().nth(1) == Some("└────────────┘"));

    let all = json(&a.run(["status", "--all", "--json"]));
    assert_eq!(all["a"].as_array().unwrap().len(), 2);
    assert_eq!(all["b"][1]["status"], "IN_USE");
    assert!(
        all["c"][0]["validation"]
            .as_str()
            .unwrap()
            .starts_with("host not reporting for 0h 5m")
    );
    assert!(all["nosuchhost.invalid"]["error"].is_string());

    let run = a.run(["status", "--all", "--remote", "b"]);
    run.assert_code(2);
    assert_eq!(
        run.stderr.trim(),
        "Error: cannot use --all and --remote together"
    );
    let run = a.run(["status", "-r", "b"]);
    run.assert_ok();
    assert!(run.stdout.starts_with("Status for b:\nGPU"), "{run:?}");
    assert!(run.stdout.contains("IN_USE"));
    let run = a.run(["status", "-r", "zz"]);
    run.assert_code(4);
    assert!(run.stderr.contains("unknown host 'zz'"), "{run:?}");
}

#[test]
fn summary_is_one_line_per_host() {
    let fleet = Fleet::launch();
    let (a, _b, _c) = three_hosts(&fleet);
    let run = a.run(["status", "--summary"]);
    run.assert_ok();
    assert_eq!(
        run.stdout.trim_end(),
        "HOST  TOTAL  GPU MODELS  AVAILABLE  IN USE\n\
         ----  -----  ----------  ---------  ------\n\
         a     2      2 Fake GPU  ✓ 2        0"
    );
    let run = a.run(["status", "--all", "-s"]);
    run.assert_ok();
    let words: Vec<Vec<&str>> = run
        .stdout
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(
        words[3],
        ["c", "(not", "reporting)", "1", "-", "✗", "0", "0"]
    );
    assert_eq!(
        words[4],
        ["nosuchhost.invalid", "(error)", "-", "-", "✗", "0", "-"]
    );
    assert_eq!(words[5], ["b", "3", "3", "Fake", "GPU", "✓", "2", "1"]);
    assert!(
        run.stderr.starts_with("warning: nosuchhost.invalid: "),
        "{run:?}"
    );
    let rows = json(&a.run(["status", "--all", "--summary", "--json"]));
    assert_eq!(rows[0]["host"], "a");
    assert_eq!(rows[1]["stale"], true);
    assert_eq!(rows[3]["in_use"], 1);
}

#[test]
fn reserve_release_and_queue_act_on_another_host() {
    let fleet = Fleet::launch();
    let (_a, b, _c) = three_hosts(&fleet);
    // A login node without GPUs of its own.
    let login = fleet.host("login");
    let run = login.run(["status"]);
    run.assert_code(4);
    assert!(run.stderr.contains("--all or --host NAME"), "{run:?}");

    let run = login.run(["reserve", "--host", "b", "--gpus", "2", "-d", "30m"]);
    run.assert_ok();
    assert!(
        run.stdout
            .starts_with("Reserved 2 GPU(s): [0, 2] on b for 0h 30m 0s"),
        "{run:?}"
    );
    assert_eq!(b.statuses(), ["IN_USE", "IN_USE", "IN_USE"]);
    let run = login.run(["reserve", "--host", "b", "--wait", "1s"]);
    assert_eq!(run.code, Some(3), "{run:?}");
    let queue = json(&login.run(["queue", "--host", "b", "--json"]));
    assert_eq!(queue["total_waiting"], 0);

    let run = login.run(["reserve", "--host", "c"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr
            .contains("cannot allocate on c: host not reporting for 0h 5m"),
        "{run:?}"
    );
    let run = login.run(["reserve", "--host", "nope"]);
    assert_eq!(run.code, Some(4), "{run:?}");
    assert!(run.stderr.contains("unknown host 'nope'"), "{run:?}");
    let run = login.run(["reserve", "--host", "-oProxyCommand=x"]);
    run.assert_code(2);

    let run = login.run(["release", "--host", "b"]);
    run.assert_ok();
    assert_eq!(run.stdout.trim(), "Released 3 GPU(s): [0, 1, 2] on b");
    assert_eq!(b.statuses(), ["AVAILABLE", "AVAILABLE", "AVAILABLE"]);
}

#[test]
fn find_ranks_the_hosts_with_enough_free_gpus() {
    let fleet = Fleet::launch();
    let (a, b, _c) = three_hosts(&fleet);
    b.run(["release"]).assert_ok();
    a.run(["reserve", "--gpu-ids", "1"]).assert_ok();
    let found = json(&a.run(["find", "--gpus", "1", "--json"]));
    let hosts: Vec<&str> = found
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["b", "a"], "most available first; c is stale");
    assert_eq!(found[0]["available"], 3);
    let run = a.run(["find", "--gpus", "2", "--short"]);
    run.assert_ok();
    assert_eq!(run.stdout, "b\n");
    let run = a.run(["find", "--gpus", "4", "--short"]);
    run.assert_code(3);
    assert_eq!(run.stdout, "");
    assert_eq!(
        run.stderr.trim(),
        "Error: no host has 4 GPU(s) available right now"
    );
    a.run(["find", "--gpus", "0"]).assert_code(2);
}

#[test]
fn report_all_adds_up_the_fleet_with_a_table_per_host() {
    let fleet = Fleet::launch();
    let a = fleet.host_with("a", 2);
    let b = fleet.host_with("b", 4);
    a.run(["reserve", "--gpus", "2"]).assert_ok();
    b.run(["reserve", "--gpus", "1"]).assert_ok();
    let report = json(&a.run(["report", "--all", "--json"]));
    assert_eq!(report["total_reservations"], 3);
    let hosts: Vec<(&str, u64)> = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["name"].as_str().unwrap(), h["gpus"].as_u64().unwrap()))
        .collect();
    assert_eq!(hosts, [("a", 2), ("b", 4)]);
    let report = json(&a.run(["report", "--host", "b", "--json"]));
    assert_eq!(report["total_reservations"], 1);
    assert!(report.get("hosts").is_none());
    let text = a.run(["report", "--all"]);
    text.assert_ok();
    assert!(
        text.stdout
            .contains("Host                   GPUs       GPU Hours   Capacity Used")
    );
    a.run(["report", "--all", "--host", "b"]).assert_code(2);
}

#[test]
fn a_decommissioned_host_leaves_the_fleet_and_its_history_stays() {
    let fleet = Fleet::launch();
    let a = fleet.host_with("a", 2);
    let _b = fleet.host_with("b", 2);
    a.run(["reserve", "--gpus", "1"]).assert_ok();
    let run = a.run(["admin", "--remove-host", "a"]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("reservations of root - use --force"),
        "{run:?}"
    );
    let run = a.run(["admin", "--remove-host", "a", "--force"]);
    run.assert_ok();
    assert_eq!(run.stdout.trim(), "Removed host a from the fleet");
    assert!(
        run.stderr.contains("Ended 1 reservation(s) on a"),
        "{run:?}"
    );
    let all = json(&a.run(["status", "--all", "--json"]));
    assert_eq!(all.as_object().unwrap().keys().collect::<Vec<_>>(), ["b"]);
    assert_eq!(fleet.redis(&["EXISTS", "canhazgpu:{a}:gpu_count"]), 0);
    assert_eq!(
        fleet.redis(&["ZCARD", "canhazgpu:{a}:usage_history_sorted"]),
        1
    );
    let run = a.run(["admin", "--remove-host", "zz"]);
    run.assert_code(4);
}

#[test]
fn the_agent_keeps_a_host_fresh_until_sigterm() {
    let fleet = Fleet::launch();
    let a = fleet.host_with("a", 2);
    let login = fleet.host("login");
    a.run(["agent", "--interval", "0s"]).assert_code(2);
    let mut agent = a
        .command(["agent", "--interval", "1s"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let fresh = || {
        let rows = json(&login.run(["status", "--all", "--summary", "--json"]));
        rows[0]["stale"] == false
    };
    assert!(
        wait_until(Duration::from_secs(5), fresh),
        "the agent publishes"
    );
    let reported: i64 = fleet
        .redis(&["HGET", "canhazgpu:hosts:reported", "a"])
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((now() - reported).abs() <= 2);
    assert_eq!(
        fleet.redis(&["HGET", "canhazgpu:hosts", "a"]),
        r#"{"interval_secs":1}"#
    );
    let started = Instant::now();
    let status = terminate(&mut agent);
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Three missed intervals later, nothing is allocated on it from elsewhere.
    assert!(wait_until(Duration::from_secs(6), || !fresh()));
    let run = login.run(["reserve", "--host", "a"]);
    assert!(
        run.stderr
            .contains("cannot allocate on a: host not reporting"),
        "{run:?}"
    );
}

#[test]
fn two_users_across_hosts_keep_their_own_reservations() {
    for user in ["chg_alice", "chg_bob"] {
        ensure_user(user);
    }
    let fleet = Fleet::launch();
    let socket_dir = fleet.server.socket().parent().unwrap().to_path_buf();
    std::fs::set_permissions(
        &socket_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let _b = fleet.host_with("b", 2);
    fleet.host("b").run(["status"]).assert_ok();
    let socket = fleet.server.socket();
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let as_user = |user: &str, args: &[&str]| -> Run {
        let mut command = std::process::Command::new("runuser");
        command
            .args(["-u", user, "--", "env"])
            .arg(format!("CANHAZGPU_REDIS_URL={}", fleet.server.url()))
            .arg("CANHAZGPU_HOST_NAME=login")
            .arg("CANHAZGPU_NVML=0")
            .arg("HOME=/nonexistent")
            .arg(BIN)
            .args(args);
        command.output().unwrap().into()
    };
    as_user("chg_alice", &["reserve", "--host", "b", "--gpu-ids", "0"]).assert_ok();
    let run = as_user("chg_bob", &["release", "--host", "b", "--gpu-ids", "0"]);
    run.assert_code(5);
    assert_eq!(
        run.stderr.trim(),
        "Error: GPU 0 is reserved by chg_alice, not by you (on b)",
        "{run:?}"
    );
    let rows = json(&as_user("chg_bob", &["status", "-r", "b", "--json"]));
    assert_eq!(rows[0]["user"], "chg_alice");
    let run = as_user("chg_alice", &["release", "--host", "b"]);
    assert_eq!(run.stdout.trim(), "Released 1 GPU(s): [0] on b", "{run:?}");
}

#[test]
fn a_damaged_record_on_one_host_spoils_only_that_gpu_or_host() {
    let fleet = Fleet::launch();
    let a = fleet.host_with("a", 2);
    let b = fleet.host_with("b", 3);
    let _c = fleet.host_with("c", 1);
    b.run(["status"]).assert_ok();
    fleet.redis(&["HSET", "canhazgpu:{b}:gpu:1", "x", "y"]);
    fleet.redis(&["SET", "canhazgpu:{c}:gpu_count", "many"]);
    fleet.redis(&["SET", "canhazgpu:{b}:snapshot", "{not json"]);
    let all = json(&a.run(["status", "--all", "--json"]));
    assert_eq!(all["a"].as_array().unwrap().len(), 2);
    let b_rows = all["b"].as_array().unwrap();
    assert_eq!(b_rows[0]["status"], "AVAILABLE");
    assert_eq!(b_rows[1]["status"], "ERROR");
    assert!(
        b_rows[1]["error"]
            .as_str()
            .unwrap()
            .contains("holds a hash")
    );
    assert!(
        b_rows[0]["validation"]
            .as_str()
            .unwrap()
            .starts_with("host not reporting"),
        "an unreadable snapshot is none"
    );
    assert!(
        all["c"]["error"]
            .as_str()
            .unwrap()
            .contains("invalid canhazgpu:{c}:gpu_count")
    );
}

#[test]
fn a_waiter_collecting_on_another_host_shows_there() {
    let fleet = Fleet::launch();
    let a = fleet.host_with("a", 1);
    let b = fleet.host_with("b", 2);
    b.run(["reserve", "--gpu-ids", "1"]).assert_ok();
    let mut waiter = a
        .command(["reserve", "--host", "b", "--gpus", "2", "--wait", "20s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let collected = || {
        let rows = json(&a.run(["status", "-r", "b", "--json"]));
        rows[0]["status"] == "IN_USE"
    };
    assert!(
        wait_until(Duration::from_secs(10), collected),
        "GPU 0 is collected"
    );
    b.run(["release"]).assert_ok();
    let status = waiter.wait().unwrap();
    assert!(status.success(), "the waiter is served: {status:?}");
    let rows = json(&a.run(["status", "-r", "b", "--json"]));
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|row| row["status"] == "IN_USE")
    );
}
