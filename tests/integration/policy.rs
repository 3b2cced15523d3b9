//! The administrator's policy (`policy.*` in the system configuration file): the
//! longest reservation and the per-user cap, on every backend, and that no user layer
//! (their own file, the environment) can change it.

use std::process::{Child, Stdio};
use std::time::Duration;

use crate::activity::with_policy;
use crate::support::cli::{CliEnv, terminate, wait_until};
use crate::support::{backend_matrix, cli_env};

fn held(env: &CliEnv) -> usize {
    env.statuses().iter().filter(|s| *s == "IN_USE").count()
}

backend_matrix! {
    longest_reservation_is_enforced => |backend| {
        let (mut env, _server) = cli_env(backend);
        with_policy(&mut env, "policy:\n  max_duration: 24h\n");
        env.init_fake(2);
        let long = env.run(["reserve", "-d", "25h"]);
        long.assert_code(2);
        assert_eq!(
            long.stderr.trim(),
            "Error: the longest reservation allowed here is 1d (policy.max_duration)"
        );
        let waiting = env.run(["reserve", "-d", "2d", "--wait", "1m"]);
        waiting.assert_code(2);
        let until = env.run(["reserve", "--until", "2099-01-01 00:00"]);
        until.assert_code(2);
        env.run(["reserve", "-G", "0", "-d", "23h"]).assert_ok();
        let extend = env.run(["extend", "2h"]);
        extend.assert_code(5);
        assert!(extend.stderr.contains("more than 1d from now"), "{extend:?}");
        env.run(["extend", "30m"]).assert_ok();

        // Neither the user's own file nor the environment changes the policy.
        std::fs::write(env.home.join(".canhazgpu.yaml"), "policy:\n  max_duration: 30d\n").unwrap();
        env.set_var("CANHAZGPU_POLICY_MAX_DURATION", "30d");
        let mine = env.run(["reserve", "-G", "1", "-d", "25h"]);
        mine.assert_code(2);
        assert!(mine.stderr.contains("'policy.max_duration' is the administrator's"), "{mine:?}");
        assert!(mine.stderr.contains("CANHAZGPU_POLICY_MAX_DURATION"), "{mine:?}");
    },
    cap_holds_under_a_storm => |backend| {
        let (mut env, _server) = cli_env(backend);
        with_policy(&mut env, "policy:\n  max_gpus_per_user: 2\n");
        env.init_fake(8);
        let three = env.run(["reserve", "--gpus", "3"]);
        three.assert_code(3);
        assert_eq!(
            three.stderr.trim(),
            "Error: at most 2 GPU(s) per user (policy.max_gpus_per_user): you hold 0 and asked for 3"
        );
        let storm: Vec<Child> = (0..30)
            .map(|_| {
                env.command(["reserve", "-d", "10m"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let codes: Vec<Option<i32>> = storm.into_iter().map(|mut c| c.wait().unwrap().code()).collect();
        assert_eq!(codes.iter().filter(|c| **c == Some(0)).count(), 2, "{codes:?}");
        assert!(codes.iter().all(|c| *c == Some(0) || *c == Some(3)), "{codes:?}");
        assert_eq!(held(&env), 2);
        // `run` counts too.
        let run = env.run(["run", "--", "true"]);
        run.assert_code(3);
        assert!(run.stderr.contains("you hold 2"), "{run:?}");
    },
    cap_only_when_contended => |backend| {
        crate::multi_user::ensure_user("chg_bob");
        let (mut env, _server) = crate::follow::shared_env(backend);
        with_policy(&mut env, "policy:\n  max_gpus_per_user: 1\n  caps_only_when_contended: true\n");
        env.init_fake(4);
        // Nobody waits: no cap.
        env.run(["reserve", "--gpus", "3", "-d", "10m"]).assert_ok();
        let mut waiter = crate::follow::user_command(&env, "chg_bob", &["reserve", "--gpus", "2", "--wait"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(wait_until(Duration::from_secs(10), || {
            env.run(["queue", "--json"]).stdout.contains("chg_bob")
        }));
        let more = env.run(["reserve", "--gpus", "1"]);
        more.assert_code(3);
        assert!(more.stderr.contains("at most 1 GPU(s) per user while others wait"), "{more:?}");
        // runuser passes SIGTERM on; the waiter leaves the queue.
        terminate(&mut waiter);
    },
}
