//! `status --watch` in a real terminal: tmux, with a server of the test's own.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::cli::{CliEnv, wait_until};

/// A tmux server on a socket of its own, running one command in a 140x30 pane.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(env: &CliEnv, args: &str, rc_file: &Path) -> Tmux {
        crate::support::require("tmux");
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let socket = format!(
            "chg-watch-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut vars = String::new();
        for (key, value) in env.command(["status"]).get_envs() {
            if let (Some(key), Some(Some(value))) = (key.to_str(), value.map(|v| v.to_str())) {
                vars.push_str(&format!("{key}='{value}' "));
            }
        }
        let script = format!(
            "env {vars} {} {args}; echo $? > {}; sleep 60",
            crate::support::cli::BIN,
            rc_file.display()
        );
        let status = Command::new("tmux")
            .args([
                "-L",
                &socket,
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-x",
                "140",
                "-y",
                "30",
            ])
            .arg(script)
            .status()
            .unwrap();
        assert!(status.success());
        Tmux { socket }
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        Command::new("tmux")
            .args(["-L", &self.socket, "send-keys", keys])
            .status()
            .unwrap();
    }

    #[track_caller]
    fn wait_for(&self, text: &str) -> String {
        let mut screen = String::new();
        let shown = wait_until(Duration::from_secs(10), || {
            screen = self.screen();
            screen.contains(text)
        });
        assert!(shown, "never showed {text:?}:\n{screen}");
        screen
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

fn exit_code(rc_file: &Path) -> String {
    let mut code = String::new();
    assert!(wait_until(Duration::from_secs(10), || {
        code = std::fs::read_to_string(rc_file).unwrap_or_default();
        !code.is_empty()
    }));
    code.trim().to_owned()
}

#[test]
fn watch_redraws_in_place_and_quits_on_q_or_ctrl_c() {
    let env = CliEnv::sqlite();
    env.init_fake(3);
    env.run(["reserve", "--gpus", "2"]).assert_ok();
    let rc_file = env.dir.path().join("rc");
    let tmux = Tmux::start(&env, "status --watch 1s", &rc_file);
    let screen = tmux.wait_for("1/3 GPUs free");
    let header = screen.lines().next().unwrap();
    assert!(
        header.ends_with("· 1/3 GPUs free · every 1s · q to quit"),
        "{screen}"
    );
    assert_eq!(screen.matches("IN_USE").count(), 2, "{screen}");
    env.run(["release"]).assert_ok();
    let screen = tmux.wait_for("3/3 GPUs free");
    // Redrawn in place: one header, one table, nothing left of the last frame.
    assert_eq!(screen.matches("GPUs free").count(), 1, "{screen}");
    assert_eq!(screen.matches("IN_USE").count(), 0, "{screen}");
    assert_eq!(screen.matches("AVAILABLE").count(), 3, "{screen}");
    tmux.keys("q");
    assert_eq!(exit_code(&rc_file), "0");
    // The alternate screen is gone: the frame is no longer on the terminal.
    assert!(!tmux.screen().contains("GPUs free"), "{}", tmux.screen());
    drop(tmux);

    std::fs::remove_file(&rc_file).unwrap();
    let tmux = Tmux::start(&env, "status -w", &rc_file);
    tmux.wait_for("every 2s");
    tmux.keys("C-c");
    assert_eq!(exit_code(&rc_file), "0");
}

#[test]
fn watch_shows_the_fleet_and_refuses_what_it_cannot_draw() {
    let server = crate::support::redis::TestRedis::launch();
    let mut env = CliEnv::redis(&server.url());
    env.set_var("CANHAZGPU_HOST_NAME", "watch-a");
    env.init_fake(2);
    let mut other = CliEnv::redis(&server.url());
    other.set_var("CANHAZGPU_HOST_NAME", "watch-b");
    other.init_fake(4);
    let rc_file = env.dir.path().join("rc");
    let tmux = Tmux::start(&env, "status --watch 1s --all", &rc_file);
    let screen = tmux.wait_for("2 hosts");
    assert!(
        screen.contains("┌─ watch-a ─┐") && screen.contains("┌─ watch-b ─┐"),
        "{screen}"
    );
    assert!(screen.contains("GPUs free"), "{screen}");
    tmux.keys("q");
    assert_eq!(exit_code(&rc_file), "0");

    let piped = env.run(["status", "--watch"]);
    piped.assert_code(2);
    assert_eq!(piped.stderr.lines().count(), 1, "{piped:?}");
    assert!(piped.stderr.contains("stdout is not one"), "{piped:?}");
    env.run(["status", "--watch", "--json"]).assert_code(2);
    let bad = env.run(["status", "--watch", "0s"]);
    bad.assert_code(2);
    assert!(
        bad.stderr.contains("expected a duration from 1s to 1h"),
        "{bad:?}"
    );
}
