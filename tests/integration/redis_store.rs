//! The Redis store beyond the common contract: data written and read by upstream
//! canhazgpu, damaged data, and connection handling.

use ::redis::{Commands, Connection};
use canhazgpu::error::Error;
use canhazgpu::state::{GpuSlot, Pool, ProviderKind, Reservation, ReservationKind, RunOwner};
use canhazgpu::state::{Selection, UnixTime, UsageRecord};
use canhazgpu::store::redis::RedisStore;
use canhazgpu::store::{NewReservation, RedisConfig, RedisLayout, ReleaseScope, Store};
use serde_json::{Value, json};

use crate::store_conformance::cases::{manual, request};
use crate::support::redis::TestRedis;

const T: UnixTime = 1_700_000_000;
const DAY: UnixTime = 86_400;

fn unix(rfc3339: &str) -> UnixTime {
    rfc3339.parse::<jiff::Timestamp>().unwrap().as_second()
}

fn connect(server: &TestRedis) -> RedisStore {
    RedisStore::connect(&server.config()).unwrap()
}

fn set(raw: &mut Connection, key: &str, value: &str) {
    let () = raw.set(key, value).unwrap();
}

fn get_json(raw: &mut Connection, key: &str) -> Value {
    let text: String = raw.get(key).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A run state as upstream's Go code rewrites it after a heartbeat.
fn go_run_state(user: &str, start: &str, heartbeat: &str) -> String {
    json!({
        "user": user, "actual_user": user, "start_time": start, "last_heartbeat": heartbeat,
        "type": "run", "expiry_time": null, "last_released": null,
    })
    .to_string()
}

#[test]
fn reads_upstream_states_and_pool() {
    let server = TestRedis::launch();
    let mut raw = server.raw();
    set(&mut raw, "canhazgpu:gpu_count", "4");
    let go_start = "2026-05-14T16:36:44-04:00";
    let go_beat = "2026-05-14T16:37:44.12345-04:00";
    set(
        &mut raw,
        "canhazgpu:gpu:0",
        &go_run_state("alice", go_start, go_beat),
    );
    let released = "2026-05-14T17:00:00.5+02:00";
    set(
        &mut raw,
        "canhazgpu:gpu:1",
        &json!({"start_time": null, "last_heartbeat": null, "expiry_time": null, "last_released": released})
            .to_string(),
    );
    set(
        &mut raw,
        "canhazgpu:gpu:2",
        r#"{"last_released": 1700000000}"#,
    );
    set(
        &mut raw,
        "canhazgpu:gpu:3",
        r#"{"user":"bob","start_time":"1700000000","expiry_time":1700003600.7,"type":"manual","note":"eval"}"#,
    );

    let mut store = connect(&server);
    // Pools from before upstream recorded the provider are NVIDIA pools.
    assert_eq!(
        store.pool().unwrap(),
        Some(Pool {
            gpu_count: 4,
            provider: ProviderKind::Nvidia
        })
    );
    let upstream = |user: &str, kind, start_time, last_heartbeat, expiry_time| Reservation {
        id: String::new(),
        user: user.into(),
        actual_user: String::new(),
        kind,
        start_time,
        last_heartbeat,
        expiry_time,
        note: None,
        owner: None,
        adopted: None,
        activity: None,
    };
    assert_eq!(
        store.slots().unwrap(),
        vec![
            GpuSlot::Held(Reservation {
                actual_user: "alice".into(),
                ..upstream(
                    "alice",
                    ReservationKind::Run,
                    unix(go_start),
                    Some(unix("2026-05-14T20:37:44Z")),
                    None
                )
            }),
            GpuSlot::Free {
                last_released: Some(unix("2026-05-14T15:00:00Z"))
            },
            GpuSlot::Free {
                last_released: Some(T)
            },
            GpuSlot::Held(Reservation {
                note: Some("eval".into()),
                ..upstream("bob", ReservationKind::Manual, T, None, Some(T + 3600))
            }),
        ]
    );

    // Bob's reservation has no actual_user: plain release goes by his user name.
    let scope = ReleaseScope::OwnManual {
        actual_user: "bob".into(),
    };
    assert_eq!(store.release(&scope, T + 60).unwrap().freed, vec![3]);
    let history = store.history(T, T + 60).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].actual_user, "bob");

    set(&mut raw, "canhazgpu:provider", "tpu");
    let err = store.pool().unwrap_err();
    assert_eq!(
        err,
        Error::Store("unknown GPU provider 'tpu' in canhazgpu:provider".into())
    );
}

#[test]
fn stale_upstream_run_is_reclaimable() {
    let server = TestRedis::launch();
    let mut store = connect(&server);
    store.init_pool(1, ProviderKind::Nvidia, false, T).unwrap();
    let start = "2026-05-14T16:36:44-04:00";
    let beat = "2026-05-14T16:37:44.9-04:00";
    set(
        &mut server.raw(),
        "canhazgpu:gpu:0",
        &go_run_state("alice", start, beat),
    );

    let last_beat = unix("2026-05-14T20:37:44Z");
    for selection in [Selection::Count(1), Selection::Ids(vec![0])] {
        let early = request(
            manual("b", "bob", last_beat + 9999),
            selection,
            last_beat + 300,
        );
        assert!(matches!(
            store.allocate(&early),
            Err(Error::NotEnough { .. } | Error::GpuTaken { .. })
        ));
    }
    let late = request(
        manual("b", "bob", last_beat + 9999),
        Selection::Count(1),
        last_beat + 301,
    );
    assert_eq!(store.allocate(&late).unwrap(), vec![0]);
    assert_eq!(
        store.history(0, UnixTime::MAX).unwrap(),
        vec![UsageRecord {
            user: "alice".into(),
            actual_user: "alice".into(),
            gpu_id: 0,
            start_time: unix(start),
            end_time: last_beat,
            kind: ReservationKind::Run,
            utilization: Default::default(),
        }]
    );
}

#[test]
fn writes_upstream_key_names_and_formats() {
    let server = TestRedis::launch();
    let mut raw = server.raw();
    let mut store = connect(&server);
    store.init_pool(2, ProviderKind::Fake, false, T).unwrap();
    let count: String = raw.get("canhazgpu:gpu_count").unwrap();
    let provider: String = raw.get("canhazgpu:provider").unwrap();
    assert_eq!((count.as_str(), provider.as_str()), ("2", "fake"));

    let display = NewReservation {
        user: "svc".into(),
        note: Some("eval run".into()),
        ..manual("m1", "alice", T + 60)
    };
    store
        .allocate(&request(display, Selection::Ids(vec![0]), T))
        .unwrap();
    let run = NewReservation {
        kind: ReservationKind::Run,
        expiry_time: None,
        owner: Some(RunOwner {
            host: "node1".into(),
            pid: 4242,
            pid_start: 123_456_789,
        }),
        ..manual("r1", "alice", 0)
    };
    store
        .allocate(&request(run, Selection::Ids(vec![1]), T + 1))
        .unwrap();
    assert_eq!(
        get_json(&mut raw, "canhazgpu:gpu:0"),
        json!({"user": "svc", "actual_user": "alice", "type": "manual", "start_time": T,
               "expiry_time": T + 60, "note": "eval run", "reservation_id": "m1"})
    );
    assert_eq!(
        get_json(&mut raw, "canhazgpu:gpu:1"),
        json!({"user": "alice", "actual_user": "alice", "type": "run", "start_time": T + 1,
               "last_heartbeat": T + 1, "reservation_id": "r1", "host": "node1",
               "pid": 4242, "pid_start_time": 123_456_789})
    );
    let last_used: Vec<(u32, UnixTime)> = raw.hgetall("canhazgpu:user_last_used:alice").unwrap();
    assert_eq!(last_used.len(), 2);

    let scope = ReleaseScope::AnyIds { ids: vec![0] };
    store.release(&scope, T + 10).unwrap();
    assert_eq!(
        get_json(&mut raw, "canhazgpu:gpu:0"),
        json!({"last_released": T + 10})
    );
    let history: Vec<(String, UnixTime)> = raw
        .zrange_withscores("canhazgpu:usage_history_sorted", 0, -1)
        .unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].1, T + 10);
    assert_eq!(
        serde_json::from_str::<Value>(&history[0].0).unwrap(),
        json!({"user": "svc", "actual_user": "alice", "gpu_id": 0, "start_time": T,
               "end_time": T + 10, "duration_seconds": 10, "reservation_type": "manual",
               "reservation_id": "m1"})
    );
    let ttl: i64 = raw.ttl("canhazgpu:usage_history_sorted").unwrap();
    assert_eq!(ttl, -1, "history must not expire as a whole");
    let last_used: UnixTime = raw.hget("canhazgpu:user_last_used:alice", 0).unwrap();
    assert_eq!(last_used, T + 10);
}

#[test]
fn history_reads_upstream_records_and_prunes_old_ones() {
    let server = TestRedis::launch();
    let mut raw = server.raw();
    let key = "canhazgpu:usage_history_sorted";
    let go_record = json!({"user": "bob", "gpu_id": 2, "start_time": "2023-11-14T22:13:20Z",
        "end_time": "2023-11-14T23:13:20.75+00:00", "duration_seconds": 3600.75,
        "reservation_type": "run"});
    let old_record = json!({"user": "eve", "actual_user": "eve", "gpu_id": 0,
        "start_time": T - 100 * DAY, "end_time": T - 91 * DAY, "duration_seconds": 9 * DAY,
        "reservation_type": "manual"});
    let () = raw.zadd(key, go_record.to_string(), T + 3600).unwrap();
    let () = raw.zadd(key, "not a record", T + 3600).unwrap();
    let () = raw.zadd(key, old_record.to_string(), T - 91 * DAY).unwrap();

    let mut store = connect(&server);
    assert_eq!(
        store.history(T, T + 3600).unwrap(),
        vec![UsageRecord {
            user: "bob".into(),
            actual_user: "bob".into(),
            gpu_id: 2,
            start_time: T,
            end_time: T + 3600,
            kind: ReservationKind::Run,
            utilization: Default::default(),
        }]
    );
    assert_eq!(store.history(T - 100 * DAY, T - 1).unwrap().len(), 1);

    // Any history write drops records that ended more than 90 days before it.
    store.init_pool(1, ProviderKind::Fake, false, T).unwrap();
    store
        .allocate(&request(manual("m", "al", T + 60), Selection::Count(1), T))
        .unwrap();
    store
        .release(&ReleaseScope::AnyIds { ids: vec![0] }, T + 5)
        .unwrap();
    let members: Vec<String> = raw.zrange(key, 0, -1).unwrap();
    assert_eq!(members.len(), 3);
    assert!(!members.iter().any(|member| member.contains("eve")));
}

#[test]
fn corrupt_state_affects_only_that_gpu() {
    let server = TestRedis::launch();
    let mut store = connect(&server);
    store.init_pool(6, ProviderKind::Fake, false, T).unwrap();
    let mut raw = server.raw();
    let damaged = [
        (1, "{not json", "invalid JSON"),
        (
            2,
            r#"{"user":"bob","type":"batch","start_time":1}"#,
            "unknown reservation type 'batch'",
        ),
        (3, r#"{"user":5}"#, "field 'user' is not a string"),
        (
            4,
            r#"{"user":"bob","type":"run","start_time":"yesterday"}"#,
            "field 'start_time' is not a time",
        ),
        (5, "[1,2]", "not a JSON object"),
    ];
    for (gpu, json, _) in damaged {
        set(&mut raw, &format!("canhazgpu:gpu:{gpu}"), json);
    }
    let slots = store.slots().unwrap();
    assert_eq!(
        slots[0],
        GpuSlot::Free {
            last_released: None
        }
    );
    for (gpu, _, why) in damaged {
        assert_eq!(
            slots[gpu],
            GpuSlot::Corrupt(format!("corrupted GPU state for GPU {gpu}: {why}"))
        );
    }

    let alice = |selection| request(manual("a", "alice", T + 60), selection, T);
    assert_eq!(
        store.allocate(&alice(Selection::Count(1))).unwrap(),
        vec![0]
    );
    assert_eq!(
        store.allocate(&alice(Selection::Count(1))),
        Err(Error::NotEnough {
            requested: 1,
            available: 0,
            unreserved: 0
        })
    );
    assert_eq!(
        store.allocate(&alice(Selection::Ids(vec![1]))),
        Err(Error::Store(
            "GPU 1 has unreadable state: corrupted GPU state for GPU 1: invalid JSON".into()
        ))
    );
    // Releasing by ID, whoever holds it, repairs a damaged GPU.
    let scope = ReleaseScope::AnyIds { ids: vec![1] };
    assert_eq!(store.release(&scope, T + 1).unwrap().freed, vec![1]);
    assert_eq!(
        store.slots().unwrap()[1],
        GpuSlot::Free {
            last_released: Some(T + 1)
        }
    );
}

fn connect_error(config: &RedisConfig) -> String {
    match RedisStore::connect(config) {
        Err(Error::Store(message)) => message,
        Err(other) => panic!("expected a store error, got {other:?}"),
        Ok(_) => panic!("connected to {config:?}"),
    }
}

#[test]
fn connection_errors_are_one_line_without_password() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let url_config = RedisConfig {
        url: Some(format!("redis+unix://{}?pass=s3cret", socket.display())),
        host: "localhost".into(),
        port: 6379,
        db: 0,
        password: None,
        password_file: None,
        system: false,
        tls: Default::default(),
        layout: RedisLayout::Fleet,
        sentinel: None,
    };
    let tcp_config = RedisConfig {
        url: None,
        host: "127.0.0.1".into(),
        port: 1,
        db: 2,
        password: Some("s3cret".into()),
        password_file: None,
        system: false,
        tls: Default::default(),
        layout: RedisLayout::Fleet,
        sentinel: None,
    };
    let user_url_config = RedisConfig {
        url: Some("redis://alice:s3cret@127.0.0.1:1/0".into()),
        ..tcp_config.clone()
    };
    let malformed_config = RedisConfig {
        url: Some("redis://alice:s3cret@127.0.0.1:port/0".into()),
        ..tcp_config.clone()
    };
    for (config, shown) in [
        (url_config, format!("redis+unix://{}", socket.display())),
        (
            malformed_config,
            "redis://alice@127.0.0.1:port/0".to_string(),
        ),
        (tcp_config, "redis://127.0.0.1:1/2".to_string()),
        (user_url_config, "redis://alice@127.0.0.1:1/0".to_string()),
    ] {
        let message = connect_error(&config);
        let prefix = format!("failed to connect to Redis at {shown}: ");
        assert!(message.starts_with(&prefix), "{message}");
        assert!(message.len() > prefix.len(), "{message}");
        assert!(!message.contains('\n'), "{message}");
        assert!(!message.contains("s3cret"), "{message}");
    }
}

#[test]
fn password_and_database_are_applied() {
    let server = TestRedis::launch_with(&["--requirepass", "s3cret"]);
    let url = format!("{}?db=3", server.url());
    let mut config = RedisConfig {
        url: Some(url.clone()),
        ..server.config()
    };
    let message = connect_error(&config);
    assert!(
        message.starts_with("failed to connect to Redis at "),
        "{message}"
    );

    config.password = Some("wrong-secret".into());
    let message = connect_error(&config);
    assert!(!message.contains("wrong-secret"), "{message}");

    config.password = Some("s3cret".into());
    let mut store = RedisStore::connect(&config).unwrap();
    store.init_pool(3, ProviderKind::Amd, false, T).unwrap();
    let mut raw = ::redis::Client::open(format!("{url}&pass=s3cret").as_str())
        .and_then(|client| client.get_connection())
        .unwrap();
    let count: String = raw.get("canhazgpu:gpu_count").unwrap();
    assert_eq!(count, "3");
    let () = ::redis::cmd("SELECT").arg(0).query(&mut raw).unwrap();
    let count: Option<String> = raw.get("canhazgpu:gpu_count").unwrap();
    assert_eq!(count, None);
}

#[test]
fn store_reconnects_after_a_restart() {
    let mut server = TestRedis::launch();
    let mut store = connect(&server);
    store.init_pool(2, ProviderKind::Fake, false, T).unwrap();
    server.stop();
    match store.pool() {
        Err(Error::Store(message)) => assert!(!message.contains('\n'), "{message}"),
        other => panic!("expected a store error while Redis is down, got {other:?}"),
    }
    // Nothing is persisted, so the restarted server has lost the pool.
    server.start();
    assert_eq!(store.pool().unwrap(), None);
    assert_eq!(store.slots(), Err(Error::NotInitialized));
}

/// While upstream canhazgpu holds its allocation lock, changes wait for it; they go
/// through as soon as it is gone, and reads never wait.
#[test]
fn upstream_allocation_lock_is_waited_for() {
    let server = TestRedis::launch();
    let mut raw = server.raw();
    let mut store = connect(&server);
    store.init_pool(2, ProviderKind::Fake, false, T).unwrap();
    let () = raw
        .set_ex("canhazgpu:allocation_lock", "locked", 10)
        .unwrap();
    assert_eq!(store.slots().unwrap().len(), 2, "reads do not wait");
    let started = std::time::Instant::now();
    let unlocker = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(400));
        let () = raw.del("canhazgpu:allocation_lock").unwrap();
    });
    let claimed = store.allocate(&request(manual("m", "al", T + 60), Selection::Count(1), T));
    let waited = started.elapsed();
    unlocker.join().unwrap();
    assert_eq!(claimed, Ok(vec![0]));
    assert!(
        waited >= std::time::Duration::from_millis(350),
        "allocated while upstream held the lock ({waited:?})"
    );
    assert!(store.retries() > 0);
}

/// A server that stopped answering (here: `SIGSTOP`) is one clear line after the
/// reply timeout, not an OS error code; the store recovers when it answers again.
#[test]
fn a_hung_server_is_named_with_the_timeout() {
    let server = TestRedis::launch();
    let mut store = connect(&server);
    store.init_pool(2, ProviderKind::Fake, false, T).unwrap();
    server.freeze(true);
    let started = std::time::Instant::now();
    let err = store.pool().unwrap_err();
    server.freeze(false);
    assert!(started.elapsed() < std::time::Duration::from_secs(8));
    let text = err.to_string();
    assert!(
        text.starts_with("Redis at redis+unix://") && text.ends_with("did not answer within 5 s"),
        "{text}"
    );
    assert!(!text.contains("os error"), "{text}");
    assert_eq!(store.pool().unwrap().map(|pool| pool.gpu_count), Some(2));
}

/// A key of the wrong type hurts only its own record: the GPU shows as unreadable
/// (root can reset it), a damaged queue key is replaced by the next waiter, a damaged
/// last-use hash or history zset is skipped; everything else keeps working.
#[test]
fn wrongly_typed_keys_affect_only_their_record() {
    let server = TestRedis::launch();
    let mut raw = server.raw();
    let mut store = connect(&server);
    store.init_pool(4, ProviderKind::Fake, false, T).unwrap();
    let () = raw.rpush("canhazgpu:gpu:3", &["a", "b"]).unwrap();
    let () = raw.set("canhazgpu:queue", "not a zset").unwrap();
    let () = raw.sadd("canhazgpu:user_last_used:al", "x").unwrap();
    let slots = store.slots().unwrap();
    assert_eq!(
        slots[3],
        GpuSlot::Corrupt(
            "corrupted GPU state for GPU 3: the key holds a list, not a JSON string".into()
        )
    );
    assert!(matches!(slots[0], GpuSlot::Free { .. }));
    assert_eq!(store.queue().unwrap(), Vec::new());
    // Allocation and release work around it; the last use is simply not recorded.
    let claimed = store
        .allocate(&request(manual("m", "al", T + 60), Selection::Count(3), T))
        .unwrap();
    assert_eq!(claimed, vec![0, 1, 2]);
    let freed = store
        .release(
            &ReleaseScope::OwnManual {
                actual_user: "al".into(),
            },
            T + 5,
        )
        .unwrap();
    assert_eq!(freed.freed, vec![0, 1, 2]);
    assert_eq!(store.history(T, T + 5).unwrap().len(), 3);
    // A waiter replaces the damaged queue key.
    let busy = request(manual("b", "bo", T + 60), Selection::Count(3), T + 6);
    store.allocate(&busy).unwrap();
    let waiter = RunOwner {
        host: "elsewhere".into(),
        pid: 1,
        pid_start: 1,
    };
    let step = store
        .join_queue(
            &request(manual("w", "wa", T + 60), Selection::Count(1), T + 7),
            &waiter,
        )
        .unwrap();
    assert!(
        matches!(
            step,
            canhazgpu::store::QueueStep::Waiting { position: 1, .. }
        ),
        "{step:?}"
    );
    // Root resets the unreadable GPU.
    let reset = store
        .release(&ReleaseScope::AnyIds { ids: vec![3] }, T + 8)
        .unwrap();
    assert_eq!(reset.freed, vec![3]);
    assert!(matches!(
        store.slots().unwrap()[3],
        GpuSlot::Held(_) | GpuSlot::Free { .. }
    ));
}

/// A provider key of the wrong type is named as such, not taken for a missing
/// provider (which would mean NVIDIA and a misleading "nvidia-smi not found").
#[test]
fn a_provider_key_of_the_wrong_type_is_named() {
    let server = TestRedis::launch();
    let mut raw = server.raw();
    let mut store = connect(&server);
    store.init_pool(2, ProviderKind::Fake, false, T).unwrap();
    let () = raw.del("canhazgpu:provider").unwrap();
    let () = raw.sadd("canhazgpu:provider", "fake").unwrap();
    let err = store.slots().unwrap_err().to_string();
    assert!(
        err.contains("canhazgpu:provider") && err.contains("holds no string"),
        "{err}"
    );
}
