//! Protected mode with real Unix users: the binary is setgid `canhazgpu`, the store
//! is the group's alone, and every way around canhazgpu (or of borrowing its group)
//! is tried and fails, on both backends.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::{Arc, Mutex};

use crate::multi_user::ensure_user;
use crate::support::cli::{BIN, Run};
use crate::support::protected::{ProtectedHost, ensure_group, ownership};
use crate::support::redis::{TestRedis, free_port};

const PASSWORD: &str = "pr0tected-Secret-7";

fn users() {
    ensure_user("chg_alice");
    ensure_user("chg_bob");
}

/// A directory of bob's own, for his files and his config.
fn bobs_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let status = Command::new("chown")
        .arg("chg_bob")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    dir
}

/// Any program as a user, outside canhazgpu.
fn as_user(user: &str, program: &str, args: &[&str]) -> Run {
    Command::new("runuser")
        .args(["-u", user, "--", program])
        .args(args)
        .output()
        .unwrap()
        .into()
}

fn gid_of_group() -> String {
    ensure_group().to_string()
}

/// One line on stderr, a failure, and not a byte of the secret.
#[track_caller]
fn refused_without_leaking(run: &Run, secret: &str) {
    assert!(!run.ok(), "{run:?}");
    assert_eq!(run.stderr.trim().lines().count(), 1, "{run:?}");
    assert!(!run.stderr.contains(secret), "{run:?}");
    assert!(!run.stdout.contains(secret), "{run:?}");
}

#[test]
fn the_embedded_store_is_reached_only_through_canhazgpu() {
    users();
    let host = ProtectedHost::sqlite();
    host.init_fake(4);
    let gid = ensure_group();
    assert_eq!(ownership(&host.state), (0, gid, 0o2770));
    let db = host.state.join("state.db");
    assert_eq!(ownership(&db), (0, gid, 0o660));
    host.run(Some("chg_alice"), &["reserve", "--gpus", "1"])
        .assert_ok();

    // Around canhazgpu: sqlite3, rm, cat, a new file in the directory.
    let db_text = db.to_str().unwrap();
    let sqlite = as_user(
        "chg_bob",
        "sqlite3",
        &[
            db_text,
            "UPDATE meta SET value = '4294967295' WHERE key = 'gpu_count'",
        ],
    );
    assert!(!sqlite.ok(), "{sqlite:?}");
    assert!(sqlite.stderr.contains("unable to open"), "{sqlite:?}");
    for (program, args) in [
        ("rm", vec!["-f", db_text]),
        ("cat", vec![db_text]),
        ("touch", vec![host.state.join("mine").to_str().unwrap()]),
    ] {
        let run = as_user("chg_bob", program, &args);
        assert!(!run.ok(), "{program}: {run:?}");
        assert!(
            run.stderr.contains("Permission denied"),
            "{program}: {run:?}"
        );
    }
    let status = host.run(Some("chg_bob"), &["status", "--json"]);
    status.assert_ok();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(rows.len(), 4, "the pool is untouched");
    assert_eq!(rows[0]["user"], "chg_alice", "alice still holds GPU 0");

    // Through canhazgpu, bob acts as bob only.
    host.run(Some("chg_bob"), &["release", "--gpu-ids", "0"])
        .assert_code(5);
    host.run(Some("chg_bob"), &["reserve", "--gpus", "1"])
        .assert_ok();

    // The environment cannot steer the privilege to another path, or to the store
    // under another name.
    let elsewhere = format!("{}/../state", host.state.display());
    let redirected = host.run_with(
        Some("chg_bob"),
        &[&format!("CANHAZGPU_STATE_DIR={elsewhere}")],
        &["status"],
    );
    redirected.assert_code(1);
    assert_eq!(redirected.stderr.lines().count(), 1, "{redirected:?}");
    assert!(redirected.stderr.contains("is protected"), "{redirected:?}");

    // Config files are read as the user: not a byte of the store comes out.
    let bob = bobs_dir();
    let link = bob.path().join("config.yaml");
    std::os::unix::fs::symlink(&db, &link).unwrap();
    for config in [db_text, link.to_str().unwrap()] {
        let run = host.run(Some("chg_bob"), &["--config", config, "status"]);
        refused_without_leaking(&run, "SQLite format");
        assert_eq!(run.stdout, "", "{run:?}");
    }
    let check = host.run(Some("chg_bob"), &["admin", "--check"]);
    check.assert_ok();
    assert!(check.stdout.starts_with("Mode: protected\n"), "{check:?}");
    assert!(
        check
            .stdout
            .contains("(directory root:canhazgpu 2770, database root:canhazgpu 0660)"),
        "{check:?}"
    );
}

#[test]
fn programs_canhazgpu_starts_never_get_its_group() {
    users();
    let host = ProtectedHost::sqlite();
    host.init_fake(2);
    let gid = gid_of_group();

    let run = host.run(Some("chg_bob"), &["run", "--gpus", "1", "--", "id", "-G"]);
    run.assert_ok();
    let groups: Vec<&str> = run.stdout.split_whitespace().collect();
    assert!(!groups.is_empty(), "{run:?}");
    assert!(!groups.contains(&gid.as_str()), "{run:?}");

    // A tool canhazgpu runs (ssh for remote_hosts; nvidia-smi and amd-smi go the
    // same way): a fake ssh on PATH writes down its groups.
    let bob = bobs_dir();
    let record = bob.path().join("ssh-groups");
    let fake_ssh = bob.path().join("ssh");
    std::fs::write(
        &fake_ssh,
        format!("#!/bin/sh\nid -G > {}\necho '[]'\n", record.display()),
    )
    .unwrap();
    std::fs::set_permissions(&fake_ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
    host.write_system_config(&format!(
        "state_dir: {}\nremote_hosts: [nodeb]\n",
        host.state.display()
    ));
    let path = format!("PATH={}:/usr/bin:/bin", bob.path().display());
    let remote = host.run_with(Some("chg_bob"), &[&path], &["status", "-r", "nodeb"]);
    let recorded = std::fs::read_to_string(&record)
        .unwrap_or_else(|err| panic!("the fake ssh did not run ({err}): {remote:?}"));
    assert!(!recorded.split_whitespace().any(|g| g == gid), "{recorded}");

    // The supervisor holds the store open: it is not dumpable (no core dump, no
    // ptrace, its /proc files are root's), unlike the same binary without setgid.
    let script = "stat -c %u /proc/$PPID/status";
    let protected = host.run(
        Some("chg_bob"),
        &["run", "--gpus", "1", "--", "sh", "-c", script],
    );
    protected.assert_ok();
    assert_eq!(protected.stdout.trim(), "0", "{protected:?}");
    let shared_state = tempfile::tempdir().unwrap();
    std::fs::set_permissions(shared_state.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let state = shared_state.path().join("s");
    let plain = |args: &[&str]| -> Run {
        Command::new("runuser")
            .args(["-u", "chg_bob", "--", "env", "HOME=/nonexistent", BIN])
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .output()
            .unwrap()
            .into()
    };
    Command::new(BIN)
        .arg("--state-dir")
        .arg(&state)
        .args(["admin", "--gpus", "1", "--provider", "fake"])
        .output()
        .unwrap();
    let control = plain(&["run", "--gpus", "1", "--", "sh", "-c", script]);
    control.assert_ok();
    let bob_uid = as_user("chg_bob", "id", &["-u"]).stdout;
    assert_eq!(control.stdout.trim(), bob_uid.trim(), "{control:?}");
}

/// A TCP server that answers every command with an error and keeps what it was sent.
fn recording_server() -> (u16, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let kept = Arc::clone(&kept);
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    let commands = buffer[..n]
                        .split(|b| *b == b'\n')
                        .filter(|line| line.starts_with(b"*"));
                    let _ =
                        stream.write_all(&b"-ERR not redis\r\n".repeat(commands.count().max(1)));
                    kept.lock().unwrap().extend_from_slice(&buffer[..n]);
                }
            });
        }
    });
    (port, seen)
}

#[test]
fn the_redis_password_is_the_groups_and_goes_only_to_the_system_server() {
    users();
    let port = free_port().to_string();
    let _server = TestRedis::launch_with(&[
        "--port",
        &port,
        "--bind",
        "127.0.0.1",
        "--requirepass",
        PASSWORD,
    ]);
    let url = format!("redis://127.0.0.1:{port}");
    let host = ProtectedHost::redis(&url, PASSWORD);
    host.init_fake(4);
    host.run(Some("chg_alice"), &["reserve", "--gpus", "1"])
        .assert_ok();
    let status = host.run(Some("chg_bob"), &["status", "--json"]);
    status.assert_ok();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(rows[0]["user"], "chg_alice");
    host.run(Some("chg_bob"), &["release", "--gpu-ids", "0"])
        .assert_code(5);

    // Around canhazgpu: redis-cli without the password, and the password file.
    let cli = as_user(
        "chg_bob",
        "redis-cli",
        &["-p", &port, "DEL", "canhazgpu:hosts"],
    );
    assert!(
        cli.stdout.contains("NOAUTH") || cli.stderr.contains("NOAUTH"),
        "{cli:?}"
    );
    let file = host.etc.join("redis-password");
    assert_eq!(ownership(&file), (0, ensure_group(), 0o640));
    let cat = as_user("chg_bob", "cat", &[file.to_str().unwrap()]);
    assert!(!cat.ok() && !cat.stdout.contains(PASSWORD), "{cat:?}");
    let system_file = host.system_path("redis-password");
    let as_config = host.run(
        Some("chg_bob"),
        &["--config", system_file.to_str().unwrap(), "status"],
    );
    refused_without_leaking(&as_config, PASSWORD);

    // Another server, named by a flag, the environment or bob's own config file,
    // never hears the password, not even when the config names the system's file.
    let (listener_port, seen) = recording_server();
    let other = format!("redis://127.0.0.1:{listener_port}");
    let bob = bobs_dir();
    let own_config = bob.path().join("config.yaml");
    std::fs::write(
        &own_config,
        format!(
            "redis.url: {other}\nredis.password_file: {}\n",
            system_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&own_config, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::copy(&own_config, bob.path().join(".canhazgpu.yaml")).unwrap();
    let attempts = [
        host.run(Some("chg_bob"), &["--redis-url", &other, "status"]),
        host.run_with(
            Some("chg_bob"),
            &[&format!("CANHAZGPU_REDIS_URL={other}")],
            &["status"],
        ),
        host.run(
            Some("chg_bob"),
            &["--config", own_config.to_str().unwrap(), "status"],
        ),
        host.run_with(
            Some("chg_bob"),
            &[&format!("HOME={}", bob.path().display())],
            &["reserve"],
        ),
    ];
    for attempt in &attempts {
        refused_without_leaking(attempt, PASSWORD);
    }
    let heard = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    assert!(!heard.is_empty(), "the other server was reached");
    assert!(!heard.contains(PASSWORD), "{heard}");

    let check = host.run(Some("chg_bob"), &["admin", "--check"]);
    check.assert_ok();
    assert!(check.stdout.starts_with("Mode: protected\n"), "{check:?}");
    assert!(
        check.stdout.contains(&format!(
            "password from {} (root:canhazgpu 0640)",
            system_file.display()
        )),
        "{check:?}"
    );
    assert!(!check.stdout.contains(PASSWORD), "{check:?}");
}

/// Without the setgid bit the same install is shared, and `admin --check` says so
/// and names what does not match.
#[test]
fn check_tells_the_modes_apart() {
    users();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    let run = |user: Option<&str>, args: &[&str]| -> Run {
        let mut cmd = match user {
            Some(user) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", user, "--", BIN]);
                cmd
            }
            None => Command::new(BIN),
        };
        cmd.env("HOME", "/nonexistent")
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .output()
            .unwrap()
            .into()
    };
    let missing = run(Some("chg_bob"), &["admin", "--check"]);
    missing.assert_code(1);
    assert!(missing.stdout.starts_with("Mode: shared\n"), "{missing:?}");
    assert!(
        missing.stdout.contains("Problem: there is no store yet"),
        "{missing:?}"
    );
    run(None, &["admin", "--gpus", "1", "--provider", "fake"]).assert_ok();
    let shared = run(Some("chg_bob"), &["admin", "--check"]);
    shared.assert_ok();
    assert!(
        shared
            .stdout
            .contains("Every user can also change the store directly"),
        "{shared:?}"
    );
    assert!(
        shared.stdout.contains("(not setgid canhazgpu)"),
        "{shared:?}"
    );

    // A protected store and a binary that is not setgid: users cannot open it.
    let gid = ensure_group();
    std::os::unix::fs::chown(&state, Some(0), Some(gid)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o2770)).unwrap();
    let locked_out = run(Some("chg_bob"), &["admin", "--check"]);
    locked_out.assert_code(1);
    assert!(
        locked_out
            .stdout
            .contains("the store is protected but this binary is not setgid canhazgpu"),
        "{locked_out:?}"
    );
    let status = run(Some("chg_bob"), &["status"]);
    status.assert_code(1);
    assert!(
        status
            .stderr
            .contains("this binary is not setgid canhazgpu"),
        "{status:?}"
    );
}

/// mTLS: the client key is the group's like the password, and canhazgpu reads it for
/// its users, only for the server the system configuration names.
#[test]
fn the_tls_client_key_is_the_groups_too() {
    users();
    let certs = tempfile::tempdir().unwrap();
    crate::redis_tls::make_certificates(certs.path());
    let (_server, url) = crate::redis_tls::tls_server(certs.path(), true);
    let read = |name: &str| std::fs::read(certs.path().join(name)).unwrap();
    let host = ProtectedHost::empty();
    let ca = host.add_system_file("ca.pem", &read("ca.pem"), false);
    let cert = host.add_system_file("client.pem", &read("client.pem"), false);
    let key = host.add_system_file("client.key", &read("client.key"), true);
    host.write_system_config(&format!(
        "redis.url: {url}\nredis.tls_ca_file: {}\nredis.tls_client_cert: {}\nredis.tls_client_key: {}\n",
        ca.display(),
        cert.display(),
        key.display()
    ));
    host.init_fake(2);
    host.run(Some("chg_bob"), &["reserve"]).assert_ok();
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&host.run(Some("chg_alice"), &["status", "--json"]).stdout).unwrap();
    assert_eq!(rows[0]["user"], "chg_bob");

    let cat = as_user(
        "chg_bob",
        "cat",
        &[host.etc.join("client.key").to_str().unwrap()],
    );
    assert!(!cat.ok() && cat.stdout.is_empty(), "{cat:?}");
    // Another server (the same one under another name): the key is not read for it.
    let other = url.replace("127.0.0.1", "localhost");
    let elsewhere = host.run(Some("chg_bob"), &["--redis-url", &other, "status"]);
    refused_without_leaking(&elsewhere, "PRIVATE KEY");
    assert!(!elsewhere.stderr.contains("cannot read"), "{elsewhere:?}");
    // A key file named by the user is read as the user.
    let own = host.run_with(
        Some("chg_bob"),
        &[&format!(
            "CANHAZGPU_REDIS_TLS_CLIENT_KEY={}",
            host.etc.join("client.key").display()
        )],
        &["status"],
    );
    own.assert_code(2);
    assert!(
        own.stderr.contains("cannot read the Redis TLS file"),
        "{own:?}"
    );
    assert!(own.stderr.contains("permission denied"), "{own:?}");
}
