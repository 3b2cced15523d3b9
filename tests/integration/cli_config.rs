//! Configuration through the real binary: files in HOME, precedence, errors, warnings.

use crate::support::cli::{CliEnv, Run};

#[test]
fn home_config_file_sets_the_store_and_flags_win() {
    let env = CliEnv::sqlite();
    let from_file = env.dir.path().join("from-file");
    std::fs::write(
        env.home.join(".canhazgpu.toml"),
        format!(
            "state_dir = \"{}\"\nbogus_key = 1\n[memory]\nthreshold = 2048\n",
            from_file.display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| -> Run {
        env.command(args)
            .env_remove("CANHAZGPU_STATE_DIR")
            .output()
            .unwrap()
            .into()
    };
    let admin = run(&["admin", "--gpus", "2", "--provider", "fake"]);
    admin.assert_ok();
    assert!(
        from_file.join("state.db").exists(),
        "state_dir from the file is used"
    );
    assert!(
        admin.stderr.contains("unknown key 'bogus_key' ignored"),
        "unknown keys warn: {admin:?}"
    );
    // The environment beats the file, a flag beats the environment.
    let via_env = env.dir.path().join("via-env");
    let env_run: Run = env
        .command(["admin", "--gpus", "1", "--provider", "fake"])
        .env("CANHAZGPU_STATE_DIR", &via_env)
        .output()
        .unwrap()
        .into();
    env_run.assert_ok();
    assert!(via_env.join("state.db").exists());
    let via_flag = env.dir.path().join("via-flag");
    let flag_run: Run = env
        .command([
            "--state-dir",
            via_flag.to_str().unwrap(),
            "admin",
            "--gpus",
            "1",
            "--provider",
            "fake",
        ])
        .env("CANHAZGPU_STATE_DIR", &via_env)
        .output()
        .unwrap()
        .into();
    flag_run.assert_ok();
    assert!(via_flag.join("state.db").exists());
}

#[test]
fn malformed_config_is_one_line_naming_file_and_key() {
    let env = CliEnv::sqlite();
    let path = env.home.join(".canhazgpu.yaml");
    std::fs::write(&path, "redis:\n  port: abc\n").unwrap();
    let run = env.run(["status"]);
    run.assert_code(2);
    assert_eq!(
        run.stderr.trim(),
        format!(
            "Error: {}: key 'redis.port': expected an integer from 1 to 65535, got \"abc\"",
            path.display()
        )
    );
    std::fs::write(&path, "redis: [unclosed\n").unwrap();
    let run = env.run(["status"]);
    run.assert_code(2);
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.contains(&path.display().to_string()), "{run:?}");
}

#[test]
fn redis_settings_select_the_redis_backend() {
    let env = CliEnv::sqlite();
    // Nothing listens on port 1: the error shows that Redis, not SQLite, was chosen.
    let run = env.run(["--redis-port", "1", "status"]);
    run.assert_code(1);
    assert!(
        run.stderr
            .starts_with("Error: failed to connect to Redis at redis://localhost:1/0"),
        "{run:?}"
    );
    let run: Run = env
        .command(["status"])
        .env("CANHAZGPU_REDIS_HOST", "127.0.0.1")
        .env("CANHAZGPU_REDIS_PORT", "1")
        .output()
        .unwrap()
        .into();
    assert!(
        run.stderr
            .starts_with("Error: failed to connect to Redis at redis://127.0.0.1:1/0"),
        "{run:?}"
    );
}

#[test]
fn a_bad_smi_timeout_is_a_usage_error() {
    let mut env = CliEnv::sqlite();
    env.init_fake(1);
    env.set_var("CANHAZGPU_SMI_TIMEOUT", "abc");
    let run = env.run(["status"]);
    run.assert_code(2);
    assert_eq!(
        run.stderr.trim(),
        "Error: invalid CANHAZGPU_SMI_TIMEOUT 'abc': expected a positive number of seconds"
    );
}

/// A FIFO as the config file or as the store, or a directory as the store, is one
/// clear error at once, never a hang.
#[test]
fn fifos_and_directories_are_refused_not_waited_on() {
    let env = CliEnv::sqlite();
    let fifo = env.dir.path().join("config.yaml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let started = std::time::Instant::now();
    let run = env.run(["--config", fifo.to_str().unwrap(), "status"]);
    run.assert_code(2);
    assert!(run.stderr.contains("not a regular file"), "{run:?}");

    let crate::support::cli::Backend::Sqlite(state) = env.backend.clone() else {
        unreachable!("an SQLite environment")
    };
    std::fs::create_dir_all(&state).unwrap();
    let db = state.join("state.db");
    let made = std::process::Command::new("mkfifo")
        .arg(&db)
        .status()
        .unwrap();
    assert!(made.success());
    let run = env.run(["status"]);
    run.assert_code(1);
    assert!(
        run.stderr
            .contains("is not a regular file, not a database file"),
        "{run:?}"
    );
    std::fs::remove_file(&db).unwrap();
    std::fs::create_dir(&db).unwrap();
    let run = env.run(["status"]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("is a directory, not a database file"),
        "{run:?}"
    );
    let admin = env.run(["admin", "--gpus", "2", "--provider", "fake"]);
    admin.assert_code(1);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}
