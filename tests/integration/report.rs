//! `canhazgpu report` through the real binary, against both backends: windows and
//! clipping, in-progress reservations, totals, the empty period, bad `--days`,
//! concurrent clean-up and the configurable retention.

use canhazgpu::state::ReservationKind::{Manual, Run};
use serde_json::Value;

use crate::support::cli::CliEnv;
use crate::support::history::{HOUR, History, now};
use crate::support::{backend_matrix, cli_env};

backend_matrix! {
    figures_are_clipped_to_the_window_and_add_up => |backend| {
        let (env, _guard) = cli_env(backend);
        figures_case(&env);
    },
    an_empty_period_is_a_clear_report => |backend| {
        let (env, _guard) = cli_env(backend);
        empty_case(&env);
    },
    days_must_be_a_positive_whole_number => |backend| {
        let (env, _guard) = cli_env(backend);
        bad_days_case(&env);
    },
    concurrent_clean_up_records_an_expired_reservation_once => |backend| {
        let (env, _guard) = cli_env(backend);
        concurrent_cleanup_case(&env);
    },
    history_retention_is_configurable => |backend| {
        let (env, _guard) = cli_env(backend);
        retention_case(env);
    },
}

/// Runs shorter than a second, and one reservation of a few seconds, give the same
/// figures on both backends; TOTAL is 100 % once any time was used.
#[test]
fn short_reservations_report_alike_on_both_backends() {
    let server = crate::support::redis::TestRedis::launch();
    let reports: Vec<Value> = [CliEnv::sqlite(), CliEnv::redis(&server.url())]
        .iter()
        .map(|env| {
            env.init_fake(2);
            for _ in 0..3 {
                env.run(["run", "--", "true"]).assert_ok();
            }
            let runs_only = report_json(env, "1");
            assert_eq!(runs_only["users"][0]["run_count"], 3, "{runs_only}");
            env.run(["reserve", "--gpus", "1", "-d", "10m"]).assert_ok();
            std::thread::sleep(std::time::Duration::from_millis(2100));
            env.run(["release"]).assert_ok();
            let report = report_json(env, "1");
            assert_eq!(report["users"][0]["percentage"], 100.0, "{report}");
            serde_json::json!([runs_only["users"], report["users"][0]["percentage"]])
        })
        .collect();
    assert_eq!(reports[0], reports[1]);
}

fn report_json(env: &CliEnv, days: &str) -> Value {
    let run = env.run(["report", "--json", "--days", days]);
    run.assert_ok();
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("report --json is not JSON ({e}): {}", run.stdout))
}

/// `(name, hours, run, manual)` of every user row.
fn rows(report: &Value) -> Vec<(String, f64, u64, u64)> {
    report["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["name"].as_str().unwrap().to_string(),
                u["gpu_hours"].as_f64().unwrap(),
                u["run_count"].as_u64().unwrap(),
                u["manual_count"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Hours of reservations still in progress grow while the test runs: allow a minute.
#[track_caller]
fn assert_hours(actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() <= 0.02,
        "{actual} hours, expected {expected}"
    );
}

fn figures_case(env: &CliEnv) {
    env.init_fake(6);
    let t = now();
    let mut history = History::open(env);
    // Started 30 h ago, ended 22 h ago: 2 h of it are in the last day, all 8 in a week.
    history.finished("alice", 0, Manual, t - 30 * HOUR, t - 22 * HOUR);
    history.finished("bob", 1, Run, t - 5 * HOUR, t - 2 * HOUR);
    history.finished("alice", 2, Manual, t - 4 * HOUR, t - 2 * HOUR);
    // Three days ago: only in the week.
    history.finished("carol", 3, Manual, t - 74 * HOUR, t - 73 * HOUR);
    // In progress: a manual one and a run one, both counted up to now.
    history.manual_since("dave", 4, t - 3 * HOUR / 2, t + HOUR);
    history.run_since("erin", 5, t - 2 * HOUR);

    let day = report_json(env, "1");
    let names: Vec<String> = rows(&day).into_iter().map(|r| r.0).collect();
    assert_eq!(names, ["alice", "bob", "erin", "dave"]);
    let figures = rows(&day);
    assert_eq!(figures[0].1, 4.0);
    assert_eq!((figures[0].2, figures[0].3), (0, 2));
    assert_eq!(figures[1].1, 3.0);
    assert_eq!((figures[1].2, figures[1].3), (1, 0));
    assert_hours(figures[2].1, 2.0);
    assert_eq!((figures[2].2, figures[2].3), (1, 0));
    assert_hours(figures[3].1, 1.5);
    assert_eq!((figures[3].2, figures[3].3), (0, 1));
    assert_hours(day["total_gpu_hours"].as_f64().unwrap(), 10.5);
    assert_eq!(day["total_reservations"], 5);
    assert_eq!(day["unique_users"], 4);
    assert_eq!(day["days"], 1);
    let percentages: f64 = day["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["percentage"].as_f64().unwrap())
        .sum();
    assert!((percentages - 100.0).abs() < 1e-6, "{percentages}");

    let week = report_json(env, "7");
    let figures = rows(&week);
    assert_eq!(figures[0].0, "alice");
    assert_eq!(figures[0].1, 10.0);
    assert!(figures.iter().any(|r| r.0 == "carol" && r.1 == 1.0));
    assert_eq!(week["total_reservations"], 6);

    let text = env.run(["report", "--days", "1"]);
    text.assert_ok();
    assert_text_totals(&text.stdout, 4, 5);
}

/// Checks the text layout and that the TOTAL row's columns are the sums of the rows.
fn assert_text_totals(text: &str, users: usize, reservations: u64) {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[1], "=== GPU Reservation Report ===", "{text}");
    assert!(
        lines[2].starts_with("Period: ") && lines[2].ends_with("(1 day)"),
        "{text}"
    );
    assert_eq!(
        lines[4].split_whitespace().collect::<Vec<_>>(),
        ["User", "GPU", "Hours", "Percentage", "Run", "Manual"]
    );
    let rule = "-".repeat(75);
    assert_eq!(lines[5], rule);
    assert_eq!(lines[6 + users], rule, "{text}");
    let columns = |line: &str| -> (String, f64, f64, u64, u64) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.len(), 5, "{line}");
        (
            fields[0].to_string(),
            fields[1].parse().unwrap(),
            fields[2].trim_end_matches('%').parse().unwrap(),
            fields[3].parse().unwrap(),
            fields[4].parse().unwrap(),
        )
    };
    let user_rows: Vec<_> = lines[6..6 + users].iter().map(|l| columns(l)).collect();
    let total = columns(lines[7 + users]);
    assert_eq!(total.0, "TOTAL");
    let cents = |hours: f64| (hours * 100.0).round() as i64;
    assert_eq!(
        cents(total.1),
        user_rows.iter().map(|r| cents(r.1)).sum::<i64>()
    );
    assert_eq!(total.2, 100.0);
    let tenths: i64 = user_rows.iter().map(|r| (r.2 * 10.0).round() as i64).sum();
    assert_eq!(tenths, 1000);
    assert_eq!(total.3, user_rows.iter().map(|r| r.3).sum::<u64>());
    assert_eq!(total.4, user_rows.iter().map(|r| r.4).sum::<u64>());
    assert_eq!(total.3 + total.4, reservations);
    assert!(text.contains(&format!(
        "\nTotal reservations: {reservations}\nUnique users: {users}\n"
    )));
    assert!(!text.contains("NaN"));
}

fn empty_case(env: &CliEnv) {
    let uninitialised = env.run(["report"]);
    uninitialised.assert_code(4);
    env.init_fake(2);
    let run = env.run(["report", "--days", "7"]);
    run.assert_ok();
    assert!(
        run.stdout
            .contains("=== GPU Reservation Report ===\nPeriod: "),
        "{run:?}"
    );
    assert!(
        run.stdout
            .contains(" (7 days)\n\nNo GPU reservations in this period.\n"),
        "{run:?}"
    );
    assert!(!run.stdout.contains("NaN"));
    let json = report_json(env, "30");
    assert_eq!(json["users"], serde_json::json!([]));
    assert_eq!(json["total_gpu_hours"], 0.0);
    assert_eq!(json["total_reservations"], 0);
    assert_eq!(json["unique_users"], 0);
    let default = env.run(["report", "--json"]);
    default.assert_ok();
    assert!(default.stdout.contains("\"days\": 30"), "{default:?}");
}

fn bad_days_case(env: &CliEnv) {
    env.init_fake(1);
    for bad in ["0", "-1", "abc", "1.5", "", "36501"] {
        let run = env.run(["report", "--days", bad]);
        run.assert_code(2);
        assert_eq!(
            run.stderr.trim(),
            format!(
                "Error: invalid number of days '{bad}': expected a whole number from 1 to 36500"
            ),
            "{run:?}"
        );
        assert!(run.stdout.is_empty());
    }
}

fn concurrent_cleanup_case(env: &CliEnv) {
    const CLAIMANTS: usize = 8;
    env.init_fake(1);
    env.run(["reserve", "--gpu-ids", "0", "--duration", "1s"])
        .assert_ok();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // Every claimant finds the expired reservation and tries to end it (with history)
    // while claiming the GPU; exactly one may succeed.
    let children: Vec<_> = (0..CLAIMANTS)
        .map(|_| {
            env.command(["reserve", "--gpu-ids", "0", "--duration", "1h"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn reserve")
        })
        .collect();
    let winners = children
        .into_iter()
        .map(|mut child| child.wait().expect("wait for reserve"))
        .filter(|status| status.success())
        .count();
    assert_eq!(winners, 1);
    // The expired reservation once, plus the winner's, in progress.
    let report = report_json(env, "1");
    assert_eq!(report["total_reservations"], 2, "{report}");
    assert_eq!(report["users"][0]["manual_count"], 2, "{report}");
}

fn retention_case(mut env: CliEnv) {
    env.init_fake(2);
    let t = now();
    // Written back then, so nothing was past any retention yet.
    History::open(&env).finished("olivia", 0, Manual, t - 50 * HOUR, t - 49 * HOUR);
    let recent = |env: &CliEnv| {
        env.run(["reserve", "--gpu-ids", "1"]).assert_ok();
        env.run(["release"]).assert_ok();
    };
    recent(&env);
    let users = |env: &CliEnv| -> Vec<String> {
        rows(&report_json(env, "7"))
            .into_iter()
            .map(|r| r.0)
            .collect()
    };
    assert!(
        users(&env).contains(&"olivia".to_string()),
        "kept for 90 days"
    );

    env.set_var("CANHAZGPU_HISTORY_RETENTION_DAYS", "1");
    recent(&env);
    assert!(
        !users(&env).contains(&"olivia".to_string()),
        "pruned after 1 day"
    );

    env.set_var("CANHAZGPU_HISTORY_RETENTION_DAYS", "0");
    let bad = env.run(["report"]);
    bad.assert_code(2);
    assert_eq!(
        bad.stderr.trim(),
        "Error: CANHAZGPU_HISTORY_RETENTION_DAYS: expected a whole number of days from 1 to 36500, got \"0\""
    );
}

#[test]
fn upstream_history_on_redis_is_reported() {
    let server = crate::support::redis::TestRedis::launch();
    let env = CliEnv::redis_upstream(&server.url());
    env.init_fake(4);
    let t = now();
    // Upstream (Go) writes display names only, and RFC 3339 times with fractions and
    // the local offset; the Python version wrote Unix seconds.
    let go_time = |secs: i64| {
        let local = jiff::Timestamp::from_second(secs - 4 * HOUR).unwrap();
        format!("{}.25-04:00", local.strftime("%Y-%m-%dT%H:%M:%S"))
    };
    let records = [
        (
            t - HOUR,
            serde_json::json!({"user": "bob", "gpu_id": 3, "start_time": go_time(t - 3 * HOUR),
                "end_time": go_time(t - HOUR), "duration_seconds": 7200.0, "reservation_type": "run"}),
        ),
        (
            t - 2 * HOUR,
            serde_json::json!({"user": "carol", "gpu_id": 1, "start_time": t - 3 * HOUR,
                "end_time": t - 2 * HOUR, "duration_seconds": 3600, "reservation_type": "manual"}),
        ),
    ];
    let mut raw = server.raw();
    for (score, member) in records {
        let added: i64 = ::redis::cmd("ZADD")
            .arg("canhazgpu:usage_history_sorted")
            .arg(score)
            .arg(member.to_string())
            .query(&mut raw)
            .unwrap();
        assert_eq!(added, 1);
    }
    let report = report_json(&env, "1");
    assert_eq!(
        rows(&report),
        [
            ("bob".to_string(), 2.0, 1, 0),
            ("carol".to_string(), 1.0, 0, 1)
        ]
    );
}
