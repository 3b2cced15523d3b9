//! Fitting into the shell: completion scripts that load in bash, zsh and fish, man
//! pages that `man` renders, `--color`, clap's suggestions, help that lists what
//! matters, and CSV for spreadsheets.

use std::process::Command;

use crate::support::cli::{BIN, CliEnv, Run};

fn shell(program: &str, args: &[&str]) -> Run {
    crate::support::require(program);
    Command::new(program)
        .args(args)
        .env("HOME", "/nonexistent")
        .output()
        .unwrap_or_else(|err| panic!("run {program}: {err}"))
        .into()
}

/// Writes `canhazgpu completion SHELL` into a file and returns its path.
fn completion_file(dir: &tempfile::TempDir, shell_name: &str) -> String {
    let env = CliEnv::sqlite();
    let run = env.run(["completion", shell_name]);
    run.assert_ok();
    assert!(run.stdout.contains("canhazgpu"), "{run:?}");
    let path = dir.path().join(format!("canhazgpu.{shell_name}"));
    std::fs::write(&path, &run.stdout).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn completion_scripts_load_and_complete_in_bash_zsh_and_fish() {
    let dir = tempfile::tempdir().unwrap();
    let bash = completion_file(&dir, "bash");
    let run = shell(
        "bash",
        &[
            "-c",
            &format!(
                "source {bash} && COMP_WORDS=(canhazgpu res) COMP_CWORD=1 && _canhazgpu canhazgpu res canhazgpu && echo \"${{COMPREPLY[@]}}\""
            ),
        ],
    );
    run.assert_ok();
    assert_eq!(run.stdout.trim(), "reserve", "{run:?}");

    let zsh = completion_file(&dir, "zsh");
    let run = shell(
        "zsh",
        &[
            "-fc",
            &format!(
                "autoload -Uz compinit && compinit -u -D && source {zsh} && whence -w _canhazgpu"
            ),
        ],
    );
    run.assert_ok();
    assert_eq!(run.stdout.trim(), "_canhazgpu: function", "{run:?}");

    let fish = completion_file(&dir, "fish");
    let run = shell(
        "fish",
        &[
            "--no-config",
            "-c",
            &format!("source {fish}; complete -C'canhazgpu reserve --gp'"),
        ],
    );
    run.assert_ok();
    assert!(run.stdout.starts_with("--gpus"), "{run:?}");

    // The package completes `chg` too, under its own name.
    let env = CliEnv::sqlite();
    let chg = env.run(["completion", "bash", "--name", "chg"]);
    chg.assert_ok();
    let chg_file = dir.path().join("chg.bash");
    std::fs::write(&chg_file, &chg.stdout).unwrap();
    let run = shell(
        "bash",
        &[
            "-c",
            &format!(
                "source {} && complete -p chg && COMP_WORDS=(chg res) COMP_CWORD=1 && _chg chg res chg && echo \"${{COMPREPLY[@]}}\"",
                chg_file.display()
            ),
        ],
    );
    run.assert_ok();
    assert!(run.stdout.trim().ends_with("reserve"), "{run:?}");
    env.run(["completion", "zsh", "--name", "x;rm"])
        .assert_code(2);

    for other in ["elvish", "powershell"] {
        assert!(!completion_file(&dir, other).is_empty());
    }
    let wrong = CliEnv::sqlite().run(["completion", "tcsh"]);
    wrong.assert_code(2);
    assert!(
        wrong.stderr.starts_with("Error: invalid value 'tcsh'"),
        "{wrong:?}"
    );
}

/// Completion needs no configuration: it works where the config file is broken.
#[test]
fn completion_works_with_a_broken_config() {
    let mut env = CliEnv::sqlite();
    let broken = env.dir.path().join("broken.yaml");
    std::fs::write(&broken, "backend: [").unwrap();
    env.set_var("CANHAZGPU_CONFIG", broken.to_str().unwrap());
    env.run(["completion", "bash"]).assert_ok();
    env.run(["status"]).assert_code(2);
}

#[test]
fn man_pages_are_generated_and_render() {
    let dir = tempfile::tempdir().unwrap();
    let env = CliEnv::sqlite();
    let run = env.run(["man", dir.path().to_str().unwrap()]);
    run.assert_ok();
    for page in [
        "canhazgpu.1",
        "canhazgpu-reserve.1",
        "canhazgpu-status.1",
        "canhazgpu-web.1",
    ] {
        assert!(dir.path().join(page).exists(), "{page}: {run:?}");
    }
    assert!(!dir.path().join("canhazgpu-keep-adopted.1").exists());
    let rendered: Run = Command::new("man")
        .arg("-l")
        .arg(dir.path().join("canhazgpu-reserve.1"))
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .unwrap()
        .into();
    rendered.assert_ok();
    assert!(rendered.stdout.contains("--gpus"), "{rendered:?}");
    assert!(
        rendered.stdout.contains("canhazgpu-reserve"),
        "{rendered:?}"
    );
    let top: Run = Command::new("man")
        .arg("-l")
        .arg(dir.path().join("canhazgpu.1"))
        .env("MANPAGER", "cat")
        .output()
        .unwrap()
        .into();
    assert!(
        top.stdout.contains("--redis-url"),
        "global options in canhazgpu(1): {top:?}"
    );
}

#[test]
fn color_follows_the_flag_and_the_environment() {
    const ESCAPE: &str = "\u{1b}[";
    let mut env = CliEnv::sqlite();
    env.init_fake(2);
    let colored = |run: &Run| {
        run.assert_ok();
        run.stdout.contains(ESCAPE)
    };
    assert!(!colored(&env.run(["status"])), "not a terminal: no colour");
    assert!(colored(&env.run(["--color", "always", "status"])));
    assert!(colored(&env.run(["status", "--color=always"])));
    assert!(!colored(&env.run(["--color", "never", "status"])));
    assert!(!colored(&env.run([
        "--color",
        "always",
        "status",
        "--no-color"
    ])));
    env.set_var("CLICOLOR_FORCE", "1");
    assert!(colored(&env.run(["status"])), "CLICOLOR_FORCE");
    assert!(!colored(&env.run(["--color", "never", "status"])));
    env.set_var("NO_COLOR", "1");
    assert!(!colored(&env.run(["status"])), "NO_COLOR wins in auto");
    let wrong = env.run(["--color", "sometimes", "status"]);
    wrong.assert_code(2);
    assert_eq!(
        wrong.stderr,
        "Error: invalid value 'sometimes' for '--color <WHEN>' [possible values: auto, always, never]\n"
    );
}

#[test]
fn a_mistyped_flag_gets_a_tip() {
    let env = CliEnv::sqlite();
    let run = env.run(["reserve", "--gpu", "2"]);
    run.assert_code(2);
    assert_eq!(
        run.stderr,
        "Error: unexpected argument '--gpu' found\n  tip: a similar argument exists: '--gpus'\n"
    );
    let run = env.run(["reserv"]);
    run.assert_code(2);
    assert!(
        run.stderr
            .starts_with("Error: unrecognized subcommand 'reserv'\n"),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("tip: ") && run.stderr.contains("'reserve'"),
        "{run:?}"
    );
}

#[test]
fn subcommand_help_lists_its_own_options_and_the_global_ones_once() {
    let env = CliEnv::sqlite();
    let status = env.run(["status", "--help"]);
    status.assert_ok();
    assert!(status.stdout.contains("--summary"), "{status:?}");
    assert!(!status.stdout.contains("--redis-url <URL>"), "{status:?}");
    assert_eq!(
        status.stdout.matches("Global options:").count(),
        1,
        "{status:?}"
    );
    assert!(
        status.stdout.contains("--redis-url, --redis-password"),
        "{status:?}"
    );
    let top = env.run(["--help"]);
    top.assert_ok();
    assert!(
        top.stdout.contains("Usage: canhazgpu [OPTIONS] <COMMAND>"),
        "{top:?}"
    );
    assert!(top.stdout.contains("--redis-url <URL>"), "{top:?}");
    assert!(top.stdout.contains("[env: CANHAZGPU_REDIS_URL]"), "{top:?}");
    // Global options still work after the subcommand.
    let run = Command::new(BIN)
        .args(["status", "--state-dir", "/nonexistent/x"])
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(4), "{run:?}");
}

#[test]
fn report_csv_is_one_row_per_user() {
    let env = CliEnv::sqlite();
    env.init_fake(2);
    env.run(["reserve", "--gpus", "2"]).assert_ok();
    env.run(["release"]).assert_ok();
    let run = env.run(["report", "--csv", "--days", "7"]);
    run.assert_ok();
    let lines: Vec<&str> = run.stdout.split("\r\n").collect();
    assert_eq!(
        lines[0],
        "user,gpu_hours,percentage,run_count,manual_count,mean_utilization_percent,start_date,end_date"
    );
    let json = env.run(["report", "--json", "--days", "7"]);
    let report: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let user = report["users"][0]["name"].as_str().unwrap();
    let fields: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(fields[0], user, "{run:?}");
    assert_eq!(fields[2], "100.00");
    assert_eq!(fields[4], report["users"][0]["manual_count"].to_string());
    assert_eq!(fields[4], "2", "one record per GPU");
    assert_eq!(fields[6], report["start_date"].as_str().unwrap());
    assert_eq!(
        lines.len(),
        3,
        "header, one user, and the final line break: {run:?}"
    );
    env.run(["report", "--csv", "--json"]).assert_code(2);
}
