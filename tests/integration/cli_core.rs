//! End-to-end tests of admin, status, reserve and release through the real binary,
//! against both backends.

use std::collections::HashSet;
use std::process::Stdio;

use crate::support::cli::{CliEnv, Run};
use crate::support::{backend_matrix, cli_env};

backend_matrix! {
    admin_initialises_and_refuses_reinit => |backend| {
        let (env, _guard) = cli_env(backend);
        admin_initialises_and_refuses_reinit_case(&env);
    },
    admin_force_keeps_the_stored_provider => |backend| {
        let (env, _guard) = cli_env(backend);
        admin_force_keeps_the_stored_provider_case(&env);
    },
    status_shows_available_then_manual_reservation => |backend| {
        let (env, _guard) = cli_env(backend);
        status_case(&env);
    },
    reserve_rules_and_errors => |backend| {
        let (env, _guard) = cli_env(backend);
        reserve_case(&env);
    },
    release_own_reservations => |backend| {
        let (env, _guard) = cli_env(backend);
        release_case(&env);
    },
    expired_reservation_is_free_without_status => |backend| {
        let (env, _guard) = cli_env(backend);
        expiry_case(&env);
    },
    concurrent_reserves_never_double_allocate => |backend| {
        let (env, _guard) = cli_env(backend);
        concurrency_case(&env);
    },
    uninitialised_pool_is_a_clear_error => |backend| {
        let (env, _guard) = cli_env(backend);
        let run = env.run(["status"]);
        run.assert_code(4);
        assert_eq!(
            run.stderr.trim(),
            "Error: GPU pool not initialized - run 'canhazgpu admin --gpus <count>' first"
        );
    },
}

fn admin_initialises_and_refuses_reinit_case(env: &CliEnv) {
    let run = env.run(["admin", "--gpus", "4", "--provider", "fake"]);
    run.assert_ok();
    assert_eq!(run.stdout.trim(), "Initialized 4 GPUs (IDs 0 to 3)");
    let again = env.run(["admin", "--gpus", "8", "--provider", "fake"]);
    again.assert_code(2);
    assert_eq!(
        again.stderr.trim(),
        "Using explicitly specified GPU provider: fake\nError: GPU pool already initialized with 4 GPUs. Use --force to reinitialize"
    );
    env.run(["reserve", "--gpus", "2"]).assert_ok();
    let forced = env.run(["admin", "--gpus", "8", "--provider", "fake", "--force"]);
    forced.assert_ok();
    assert_eq!(forced.stdout.trim(), "Reinitialized 8 GPUs (IDs 0 to 7)");
    assert_eq!(env.statuses(), vec!["AVAILABLE"; 8]);
    let zero = env.run(["admin", "--gpus", "0", "--provider", "fake"]);
    zero.assert_code(2);
    assert!(
        zero.stderr.contains("--gpus must be at least 1"),
        "{zero:?}"
    );
}

/// `--force` without `--provider` re-initialises with the pool's provider instead of
/// detecting one (none would be found here: no GPU tools on PATH).
fn admin_force_keeps_the_stored_provider_case(env: &CliEnv) {
    env.run(["admin", "--gpus", "4", "--provider", "fake"])
        .assert_ok();
    env.run(["reserve", "--gpus", "2"]).assert_ok();
    let forced = env.run(["admin", "--gpus", "2", "--force"]);
    forced.assert_ok();
    assert!(
        forced
            .stderr
            .contains("Keeping the pool's GPU provider: fake"),
        "{forced:?}"
    );
    assert_eq!(forced.stdout.trim(), "Reinitialized 2 GPUs (IDs 0 to 1)");
    assert_eq!(env.statuses(), vec!["AVAILABLE"; 2]);
    // Without --force there is nothing to keep: detection runs, and finds nothing.
    let fresh = env.run(["admin", "--gpus", "2"]);
    fresh.assert_code(1);
    assert!(fresh.stderr.contains("no GPU provider found"), "{fresh:?}");
}

fn status_case(env: &CliEnv) {
    env.init_fake(2);
    let table = env.run(["status"]);
    table.assert_ok();
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "GPU",
            "STATUS",
            "USER",
            "DURATION",
            "TYPE",
            "MODEL",
            "DETAILS",
            "VALIDATION"
        ]
    );
    assert!(lines[1].starts_with("---  ------"), "{}", lines[1]);
    assert!(lines[2].starts_with("0    AVAILABLE"), "{}", lines[2]);
    assert!(lines[2].contains("never used") && lines[2].ends_with("0MB used"));
    assert!(!table.stdout.contains('\u{1b}'), "no colour when piped");

    env.run(["reserve", "--gpu-ids", "1", "--duration", "2h"])
        .assert_ok();
    let rows = env.status_json();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["status"], "AVAILABLE");
    assert_eq!(rows[0]["details"], "never used");
    let me = current_user();
    assert_eq!(rows[1]["status"], "IN_USE");
    assert_eq!(rows[1]["user"], me.as_str());
    assert_eq!(rows[1]["type"], "MANUAL");
    // The fake provider reports 0% utilization.
    assert_eq!(rows[1]["validation"], "no usage detected, 0% util");
    assert_eq!(rows[1]["utilization_percent"], 0);
    let details = rows[1]["details"].as_str().unwrap();
    assert!(
        details.starts_with("expires in 2h 0m 0s (at 20")
            || details.starts_with("expires in 1h 59m 59s (at 20"),
        "{details}"
    );
    assert!(rows[1]["duration"].as_str().unwrap().starts_with("0h 0m"));

    let table = env.run(["status"]);
    let row = table.stdout.lines().nth(3).unwrap();
    assert!(row.starts_with("1    IN_USE"), "{row}");
    assert!(row.contains(" MANUAL ") && row.contains(&me), "{row}");
}

fn reserve_case(env: &CliEnv) {
    env.init_fake(4);
    let run = env.run(["reserve", "--gpus", "2", "--duration", "30m"]);
    run.assert_ok();
    let (first, rest) = run.stdout.split_once('\n').unwrap();
    assert!(
        first.starts_with("Reserved 2 GPU(s): [0, 1] for 0h 30m 0s (until 20"),
        "{first}"
    );
    assert_eq!(
        rest,
        "\nRun the following command to run only on these GPUs:\nexport CUDA_VISIBLE_DEVICES=0,1\n"
    );
    let default = env.run(["reserve"]);
    default.assert_ok();
    assert!(
        default
            .stdout
            .starts_with("Reserved 1 GPU(s): [2] for 8h 0m 0s"),
        "{default:?}"
    );

    for bad in ["0m", "-5m", "abc", "5", "1.2.3h", ""] {
        let run = env.run(["reserve", "--duration", bad]);
        run.assert_code(2);
        assert_eq!(
            run.stderr.lines().count(),
            1,
            "one line for {bad:?}: {run:?}"
        );
        assert!(run.stderr.starts_with("Error: invalid duration"), "{run:?}");
    }
    let conflict = env.run(["reserve", "--gpus", "3", "--gpu-ids", "1,2"]);
    conflict.assert_code(2);
    assert!(
        conflict
            .stderr
            .contains("conflicting --gpus (3) and --gpu-ids (2 IDs)")
    );
    env.run(["reserve", "--gpus", "1", "--gpu-ids", "3"])
        .assert_ok();

    let taken = env.run(["reserve", "--gpu-ids", "1"]);
    taken.assert_code(3);
    // The caller's own reservation is named as theirs, not as a third party's.
    assert_eq!(taken.stderr.trim(), "Error: you already hold GPU 1");
    let range = env.run(["reserve", "--gpu-ids", "9"]);
    range.assert_code(2);
    assert_eq!(range.stderr.trim(), "Error: GPU ID 9 is out of range (0-3)");

    env.run(["release"]).assert_ok();
    env.run(["reserve", "--gpu-ids", "0,1,2"]).assert_ok();
    // All or nothing: 3 is free but 2 is not, so neither is taken.
    env.run(["release", "--gpu-ids", "0,1"]).assert_ok();
    let partial = env.run(["reserve", "--gpu-ids", "2,3"]);
    partial.assert_code(3);
    assert_eq!(
        env.statuses(),
        ["AVAILABLE", "AVAILABLE", "IN_USE", "AVAILABLE"]
    );

    let not_enough = env.run(["reserve", "--gpus", "4"]);
    not_enough.assert_code(3);
    assert_eq!(
        not_enough.stderr.trim(),
        "Error: Not enough GPUs available. Requested: 4, Available: 3"
    );
    let too_many = env.run(["reserve", "--gpus", "5"]);
    too_many.assert_code(2);
    assert_eq!(
        too_many.stderr.trim(),
        "Error: Requested 5 GPUs but this machine's pool has only 4"
    );
}

fn release_case(env: &CliEnv) {
    env.init_fake(4);
    let none = env.run(["release"]);
    none.assert_ok();
    assert_eq!(
        none.stdout.trim(),
        "No manually reserved GPUs found for current user"
    );
    env.run(["reserve", "--gpu-ids", "1,3"]).assert_ok();
    let released = env.run(["release"]);
    assert_eq!(released.stdout.trim(), "Released 2 GPU(s): [1, 3]");
    env.run(["reserve", "--gpu-ids", "1,3"]).assert_ok();
    let one = env.run(["release", "--gpu-ids", "3"]);
    assert_eq!(one.stdout.trim(), "Released 1 GPU(s): [3]");
    let duplicate = env.run(["release", "--gpu-ids", "1,1"]);
    duplicate.assert_code(2);
    assert_eq!(duplicate.stderr.trim(), "Error: duplicate GPU ID: 1");
    let again = env.run(["release", "--gpu-ids", "0,2"]);
    again.assert_code(5);
    assert_eq!(
        again.stderr,
        "Error: GPU 0 is not reserved\nError: GPU 2 is not reserved\n"
    );
    // The caller's GPUs among them are still released.
    let mixed = env.run(["release", "--gpu-ids", "0,1"]);
    mixed.assert_code(5);
    assert_eq!(mixed.stdout.trim(), "Released 1 GPU(s): [1]");
    // A receipt for the released GPU, then the refusal.
    assert_eq!(
        mixed.stderr,
        "GPU 1: held 0h 0m\nError: GPU 0 is not reserved\n"
    );
    env.run(["reserve", "--gpu-ids", "1"]).assert_ok();
    // $USER is not an identity: pretending to be someone else releases nothing of theirs
    // and still releases the caller's own reservations.
    let spoof = env
        .command(["release"])
        .env("USER", "mallory")
        .output()
        .unwrap();
    let spoof = Run::from(spoof);
    assert_eq!(spoof.stdout.trim(), "Released 1 GPU(s): [1]");
    assert_eq!(env.statuses(), vec!["AVAILABLE"; 4]);
}

fn expiry_case(env: &CliEnv) {
    env.init_fake(1);
    // Times are whole seconds, so a 2 s reservation lasts more than 1 s and at most 2 s.
    env.run(["reserve", "--duration", "2s"]).assert_ok();
    env.run(["reserve"]).assert_code(3);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    // No `status` in between: allocation itself treats the expired reservation as free.
    env.run(["reserve", "--duration", "1h"]).assert_ok();
    let details = env.status_json()[0]["details"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        details.starts_with("expires in 1h 0m 0s (at ")
            || details.starts_with("expires in 0h 59m 59s (at "),
        "{details}"
    );
}

fn concurrency_case(env: &CliEnv) {
    env.init_fake(8);
    let children: Vec<_> = (0..64)
        .map(|_| {
            env.command(["reserve", "--gpus", "1", "--duration", "1h"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let runs: Vec<Run> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait").into())
        .collect();
    let winners: Vec<&Run> = runs.iter().filter(|r| r.ok()).collect();
    assert_eq!(winners.len(), 8, "exactly 8 of 64 succeed");
    let gpus: HashSet<String> = winners
        .iter()
        .map(|r| r.stdout.lines().last().unwrap().to_string())
        .collect();
    assert_eq!(gpus.len(), 8, "every winner got a different GPU: {gpus:?}");
    for loser in runs.iter().filter(|r| !r.ok()) {
        loser.assert_code(3);
        assert!(
            loser
                .stderr
                .starts_with("Error: Not enough GPUs available. Requested: 1, Available: 0"),
            "{loser:?}"
        );
    }
    assert_eq!(env.statuses(), vec!["IN_USE"; 8]);
}

pub fn current_user() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn corrupt_gpu_state_is_an_error_row_and_the_others_still_show() {
    let server = crate::support::redis::TestRedis::launch();
    let env = CliEnv::redis_upstream(&server.url());
    env.init_fake(3);
    env.run(["reserve", "--gpu-ids", "2"]).assert_ok();
    let _: () = ::redis::cmd("SET")
        .arg("canhazgpu:gpu:1")
        .arg("{not json")
        .query(&mut server.raw())
        .unwrap();
    let rows = env.status_json();
    assert_eq!(rows[0]["status"], "AVAILABLE");
    assert_eq!(rows[1]["status"], "ERROR");
    assert!(
        rows[1]["error"]
            .as_str()
            .unwrap()
            .starts_with("corrupted GPU state for GPU 1"),
        "{}",
        rows[1]
    );
    assert_eq!(rows[2]["status"], "IN_USE");
    let table = env.run(["status"]);
    assert!(
        table
            .stdout
            .lines()
            .nth(3)
            .unwrap()
            .starts_with("1    ERROR"),
        "{table:?}"
    );
    // The corrupt GPU is never handed out; the healthy free one is.
    let run = env.run(["reserve", "--gpus", "1"]);
    assert!(run.stdout.starts_with("Reserved 1 GPU(s): [0]"), "{run:?}");
    env.run(["reserve", "--gpus", "1"]).assert_code(3);
}

/// `canhazgpu status | head -1`: a reader that stops early is not a failure, and
/// nothing panics.
#[test]
fn closed_stdout_is_not_an_error() {
    let env = CliEnv::sqlite();
    env.init_fake(2);
    for args in [&["status"][..], &["reserve"], &["release"], &["queue"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let run: Run = env.command(args).stdout(writer).output().unwrap().into();
        assert_eq!(run.code, Some(0), "{args:?}: {run:?}");
        assert_eq!(run.stderr, "", "{args:?}: {run:?}");
    }
}

#[test]
fn no_arguments_prints_the_usage() {
    let env = CliEnv::sqlite();
    let run = env.run(std::iter::empty::<&str>());
    run.assert_code(2);
    assert!(
        run.stderr.contains("Usage: canhazgpu [OPTIONS] <COMMAND>"),
        "{run:?}"
    );
    assert!(run.stderr.contains("reserve"), "{run:?}");
}

/// Inputs that only look like numbers or durations are usage errors (exit 2, one
/// line), never something else: an empty `--wait` does not mean "without limit".
#[test]
fn look_alike_numbers_and_durations_are_usage_errors() {
    let env = CliEnv::sqlite();
    env.init_fake(2);
    env.run(["reserve", "-d", "1h"]).assert_ok();
    let started = std::time::Instant::now();
    for args in [
        &["reserve", "--wait", "", "--gpus", "2"][..],
        &["reserve", "--gpus", "+1"],
        &["reserve", "-G", "+1"],
        &["reserve", "--gpus", " 1"],
        &["reserve", "-d", "1d1d"],
        &["run", "--gpus", "+1", "--", "true"],
        &["admin", "--gpus", "+4", "--provider", "fake", "--force"],
    ] {
        let run = env.run(args.iter().copied());
        run.assert_code(2);
        assert_eq!(run.stderr.lines().count(), 1, "{args:?}: {run:?}");
        assert!(run.stderr.starts_with("Error: "), "{args:?}: {run:?}");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(env.statuses(), ["IN_USE", "AVAILABLE"]);
}

/// A pool size beyond what `admin` allows, written into the store by hand, is one
/// clear error on both backends: no huge allocation, no abort, no stalled server.
#[test]
fn an_impossible_pool_size_in_the_store_is_a_clear_error() {
    let sqlite = CliEnv::sqlite();
    sqlite.init_fake(2);
    let crate::support::cli::Backend::Sqlite(state) = &sqlite.backend else {
        unreachable!("an SQLite environment")
    };
    let db = state.join("state.db");
    let forged = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("UPDATE meta SET value = '4294967295' WHERE key = 'gpu_count'")
        .status()
        .unwrap();
    assert!(forged.success());
    let run = sqlite.run(["status"]);
    run.assert_code(1);
    assert_eq!(
        run.stderr.trim(),
        "Error: corrupted GPU pool settings: invalid gpu_count '4294967295'"
    );

    let server = crate::support::redis::TestRedis::launch();
    let redis = CliEnv::redis_upstream(&server.url());
    redis.init_fake(2);
    let mut raw = server.raw();
    let () = ::redis::Commands::set(&mut raw, "canhazgpu:gpu_count", "4294967295").unwrap();
    let started = std::time::Instant::now();
    for args in [&["status"][..], &["reserve"], &["release"]] {
        let run = redis.run(args.iter().copied());
        run.assert_code(1);
        assert_eq!(
            run.stderr.trim(),
            "Error: invalid canhazgpu:gpu_count in Redis: '4294967295'"
        );
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let pong: String = ::redis::cmd("PING").query(&mut raw).unwrap();
    assert_eq!(pong, "PONG", "the server is not stalled");
}
