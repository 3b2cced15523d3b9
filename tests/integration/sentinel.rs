//! Redis Sentinel end to end: a real master, replica and three sentinels; the master
//! is killed with `kill -9` after the replica stopped receiving writes, and every
//! long-running canhazgpu follows the failover to the promoted replica.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use canhazgpu::state::{ProviderKind, UnixTime};
use canhazgpu::store::Store;
use canhazgpu::store::redis::RedisStore;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::cli::{CliEnv, wait_until};
use crate::support::redis::{TestSentinels, free_port};
use crate::support::web::WebServer;

const T: UnixTime = 1_700_000_000;

/// How soon after the promotion everything must work again.
const RECOVERY: Duration = Duration::from_secs(15);

fn spawn(env: &CliEnv, args: &[&str]) -> Child {
    env.command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start canhazgpu")
}

/// The `type` of every GPU in `status --json`, or `None` while status fails.
fn types(env: &CliEnv) -> Option<Vec<String>> {
    let status = env.run(["status", "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&status.stdout).ok()?;
    let types = rows
        .iter()
        .map(|row| row["type"].as_str().unwrap_or("-").to_string());
    status.ok().then(|| types.collect())
}

/// The rest of a child's stderr, once it has exited.
fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(stderr) = child.stderr.as_mut() {
        let _ = stderr.read_to_string(&mut text);
    }
    text
}

#[test]
fn a_failover_is_followed_by_run_waiter_and_web() {
    let mut cluster = TestSentinels::launch();
    let env = CliEnv::sentinel(&cluster.addresses());
    env.init_fake(2);
    env.run(["reserve", "--gpu-ids", "0", "--duration", "1h"])
        .assert_ok();
    let mut waiter = spawn(&env, &["reserve", "--wait", "--short", "--gpu-ids", "0"]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let queue = env.run(["queue", "--json"]);
            queue.ok() && queue.stdout.contains("\"total_waiting\": 1")
        }),
        "the waiter joined the queue"
    );
    let web = WebServer::start(&env, 1);
    assert_eq!(web.get("/healthz").status, 200);

    // From here on the replica misses every write, the run's reservation included.
    cluster.stop_replication();
    let mut run = spawn(
        &env,
        &[
            "run",
            "--gpu-ids",
            "1",
            "--heartbeat-interval",
            "1s",
            "--",
            "sh",
            "-c",
            "echo $$; exec sleep 120",
        ],
    );
    let mut line = String::new();
    BufReader::new(run.stdout.as_mut().expect("piped stdout"))
        .read_line(&mut line)
        .expect("the command's PID");
    let command = Pid::from_raw(line.trim().parse().expect("a PID"));
    assert_eq!(types(&env).unwrap(), ["MANUAL", "RUN"]);
    let replica_keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*gpu:1")
        .query(&mut cluster.replica.raw())
        .unwrap();
    assert_eq!(
        replica_keys,
        Vec::<String>::new(),
        "the replica lacks the run"
    );

    cluster.master.stop();
    assert!(
        wait_until(Duration::from_secs(30), || cluster.replica_promoted()),
        "the replica was not promoted: {}",
        cluster.logs()
    );
    let deadline = Instant::now() + RECOVERY;
    let left = || deadline.saturating_duration_since(Instant::now());

    assert!(
        wait_until(left(), || types(&env)
            .is_some_and(|t| t == ["MANUAL", "RUN"])),
        "status shows the run's reservation on the new master: {:?}",
        types(&env)
    );
    assert!(kill(command, None).is_ok(), "the command still runs");
    assert_eq!(run.try_wait().unwrap(), None, "canhazgpu run still runs");

    env.run(["release", "--gpu-ids", "0"]).assert_ok();
    assert!(
        wait_until(left(), || waiter.try_wait().unwrap().is_some()),
        "the waiter was served"
    );
    let mut served = String::new();
    waiter
        .stdout
        .as_mut()
        .unwrap()
        .read_to_string(&mut served)
        .unwrap();
    let waited = stderr_of(&mut waiter);
    assert_eq!(waiter.wait().unwrap().code(), Some(0), "{waited}");
    assert_eq!(served, "0\n", "{waited}");

    assert!(
        wait_until(left(), || web.get("/healthz").status == 200),
        "/healthz answers again: {:?}",
        web.get("/healthz")
    );

    kill(Pid::from_raw(run.id() as i32), Signal::SIGTERM).expect("stop canhazgpu run");
    let ended = run.wait().unwrap();
    let said = stderr_of(&mut run);
    assert_eq!(ended.code(), Some(128 + 15), "{said}");
    assert!(
        said.contains(
            "the store moved to a new Redis master; reservation of GPU(s) [1] re-asserted"
        ),
        "{said}"
    );
    assert_eq!(
        types(&env).unwrap(),
        ["MANUAL", "-"],
        "the run released GPU 1"
    );
}

/// Sentinels that cannot be reached are one line naming them and the master.
#[test]
fn unreachable_sentinels_are_named_in_one_line() {
    let ports = [free_port(), free_port()];
    let addresses = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
    let mut env = CliEnv::sentinel(&addresses);
    env.set_var("CANHAZGPU_REDIS_PASSWORD", "s3cret");
    let started = Instant::now();
    let status = env.run(["status"]);
    status.assert_code(1);
    let error = status.stderr.trim_end();
    assert!(
        error.starts_with(&format!(
            "Error: failed to connect to Redis: no sentinel of master 'mymaster' answered (127.0.0.1:{}: ",
            ports[0]
        )),
        "{error}"
    );
    assert!(
        error.contains(&format!("; 127.0.0.1:{}: ", ports[1])),
        "{error}"
    );
    assert!(
        !error.contains('\n') && !error.contains("s3cret"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(3), "failed at once");
}

/// A master demoted behind the store's back (its connection stays open) refuses the
/// write with READONLY: the store drops the connection, asks the sentinels again and
/// makes the write on the new master.
#[test]
fn a_write_refused_as_read_only_goes_to_the_new_master() {
    let cluster = TestSentinels::launch();
    let mut store = RedisStore::connect(&cluster.config()).expect("connect through Sentinel");
    store.init_pool(2, ProviderKind::Fake, false, T).unwrap();

    let mut replica = cluster.replica.raw();
    let () = ::redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut replica)
        .unwrap();
    cluster.tell_sentinels(::redis::cmd("SENTINEL").arg("REMOVE").arg("mymaster"));
    cluster.tell_sentinels(
        ::redis::cmd("SENTINEL")
            .arg("MONITOR")
            .arg("mymaster")
            .arg("127.0.0.1")
            .arg(cluster.replica_port)
            .arg(2),
    );
    let mut old_master = cluster.master.raw();
    let () = ::redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(cluster.replica_port)
        .query(&mut old_master)
        .unwrap();

    let outcome = store.init_pool(3, ProviderKind::Fake, true, T).unwrap();
    assert!(store.followed_failover(), "{outcome:?}");
    assert!(!store.followed_failover(), "asking clears it");
    let pool = store.pool().unwrap().expect("a pool");
    assert_eq!(pool.gpu_count, 3);
    let counts: Vec<String> = ::redis::cmd("KEYS")
        .arg("*gpu_count")
        .query(&mut replica)
        .unwrap();
    let written: String = ::redis::cmd("GET")
        .arg(&counts[0])
        .query(&mut replica)
        .unwrap();
    assert_eq!(written, "3", "the new master holds the write");
}

/// The master's password reaches the master, and the sentinels when they ask for
/// one; a refused password fails at once, and no message shows it.
#[test]
fn passwords_go_to_the_master_and_to_sentinels_that_ask() {
    let cluster = TestSentinels::launch();
    let () = ::redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("s3cret")
        .query(&mut cluster.master.raw())
        .unwrap();
    let mut env = CliEnv::sentinel(&cluster.addresses());
    for password in [None, Some("wrong-s3cret")] {
        if let Some(password) = password {
            env.set_var("CANHAZGPU_REDIS_PASSWORD", password);
        }
        let started = Instant::now();
        let refused = env.run(["status"]);
        refused.assert_code(1);
        let error = refused.stderr.trim_end();
        assert!(
            error.starts_with("Error: failed to connect to Redis: master 'mymaster' at 127.0.0.1:"),
            "{error}"
        );
        assert!(
            !error.contains('\n') && !error.contains("s3cret"),
            "{error}"
        );
        assert!(started.elapsed() < Duration::from_secs(3), "failed at once");
    }
    cluster.tell_sentinels(
        ::redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg("on")
            .arg(">s3cret"),
    );
    env.set_var("CANHAZGPU_REDIS_PASSWORD", "s3cret");
    env.init_fake(1);
    assert_eq!(env.statuses(), ["AVAILABLE"]);
}
