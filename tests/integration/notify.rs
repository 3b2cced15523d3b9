//! Notifications reach people exactly once, with two agents running: on a real
//! HTTP server (the webhook), a real SMTP server (Python's `smtpd`) and a real
//! terminal (a pseudo-terminal listed in a utmp file), on every backend; and a user
//! who muted theirs gets none.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::activity::with_policy;
use crate::support::cli::{CliEnv, terminate, wait_until};
use crate::support::fake_smi::FakeSmi;
use crate::support::redis::free_port;
use crate::support::{backend_matrix, cli_env};

/// An HTTP server on 127.0.0.1 that answers 200 and keeps each request's body.
struct Webhook {
    url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Webhook {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(value) = lower.strip_prefix("content-length:") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).is_ok()
                    && let Ok(json) = serde_json::from_slice(&body)
                {
                    kept.lock().unwrap().push(json);
                }
                let mut stream = stream;
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
            }
        });
        Webhook { url, bodies }
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        let bodies = self.bodies.lock().unwrap();
        bodies
            .iter()
            .filter(|b| b["event"] == kind)
            .cloned()
            .collect()
    }
}

/// Everything `output` prints, as it arrives (read on a thread of its own).
fn collected(mut output: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let kept = text.clone();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = output.read(&mut buffer) {
            if n == 0 {
                break;
            }
            kept.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    });
    text
}

/// Python's SMTP server, printing every message it receives.
struct SmtpSink {
    port: u16,
    child: Child,
    received: Arc<Mutex<String>>,
}

impl SmtpSink {
    fn start() -> Self {
        let port = free_port();
        let mut child = Command::new("python3")
            .args([
                "-u",
                "-W",
                "ignore",
                "-m",
                "smtpd",
                "-n",
                "-c",
                "DebuggingServer",
            ])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m smtpd");
        let received = collected(child.stdout.take().unwrap());
        assert!(wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }));
        SmtpSink {
            port,
            child,
            received,
        }
    }

    fn subjects(&self, kind: &str) -> usize {
        self.received
            .lock()
            .unwrap()
            .matches(&format!("Subject: canhazgpu: {kind} on "))
            .count()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pseudo-terminal whose output is collected; `mesg` says whether it accepts
/// messages (group-writable, as `mesg y` makes it).
struct Terminal {
    child: Child,
    seen: Arc<Mutex<String>>,
    /// `pts/N`.
    line: String,
}

/// A utmp file listing `terminals` as logins of the current user.
fn utmp_of(dir: &std::path::Path, terminals: &[&Terminal]) -> std::path::PathBuf {
    let user = crate::cli_core::current_user();
    let mut records = Vec::new();
    for terminal in terminals {
        let mut record = vec![0u8; 384];
        record[0..4].copy_from_slice(&7i32.to_ne_bytes());
        record[8..8 + terminal.line.len()].copy_from_slice(terminal.line.as_bytes());
        record[44..44 + user.len()].copy_from_slice(user.as_bytes());
        records.extend(record);
    }
    let utmp = dir.join("utmp");
    std::fs::write(&utmp, records).unwrap();
    utmp
}

impl Terminal {
    fn open(mesg: bool) -> Self {
        let mode = if mesg { "0o620" } else { "0o600" };
        let script = format!(
            "import os,pty,sys\nm,s=pty.openpty()\nos.chmod(os.ttyname(s),{mode})\n\
             print(os.ttyname(s),flush=True)\nwhile True:\n    d=os.read(m,4096)\n    \
             sys.stdout.write(d.decode(errors='replace'));sys.stdout.flush()\n"
        );
        let mut child = Command::new("python3")
            .args(["-u", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut device = String::new();
        out.read_line(&mut device).unwrap();
        let line = device.trim().trim_start_matches("/dev/").to_string();
        let seen = collected(out);
        Terminal { child, seen, line }
    }

    fn lines(&self, text: &str) -> usize {
        self.seen.lock().unwrap().matches(text).count()
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent(env: &CliEnv) -> Child {
    env.command(["agent", "--interval", "1s"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

backend_matrix! {
    every_channel_gets_each_event_once_with_two_agents => |backend| {
        let (mut env, _server) = cli_env(backend);
        let hook = Webhook::start();
        let smtp = SmtpSink::start();
        let terminal = Terminal::open(true);
        let refusing = Terminal::open(false);
        let utmp = utmp_of(env.dir.path(), &[&terminal, &refusing]);
        env.set_var("CANHAZGPU_UTMP", utmp.to_str().unwrap());
        with_policy(
            &mut env,
            &format!(
                "policy:\n  idle_release_after: 4s\n  idle_warning: 2s\nnotify:\n  terminals: true\n  \
                 webhook_url: {}\n  expiry_warning: 20m\n  smtp:\n    host: 127.0.0.1\n    port: {}\n    \
                 from: canhazgpu@example.com\n    to: \"{{user}}@example.com\"\n",
                hook.url, smtp.port
            ),
        );
        let mut smi = FakeSmi::nvidia(env.dir.path(), 2);
        env.path_prefix.push(smi.path_dir());
        env.run(["admin", "--gpus", "2"]).assert_ok();
        env.run(["reserve", "-G", "0", "-d", "1h"]).assert_ok();
        env.run(["reserve", "-G", "1", "-d", "10m"]).assert_ok();
        smi.set_utilization(1, 90);
        let agents = [agent(&env), agent(&env)];
        assert!(wait_until(Duration::from_secs(30), || {
            hook.events("idle_release").len() == 1
                && smtp.subjects("idle_release") == 1
                && terminal.lines("was released after being idle") == 1
        }), "webhook {:?}\nmail {}\nterminal {}", hook.bodies.lock().unwrap(),
            smtp.received.lock().unwrap(), terminal.seen.lock().unwrap());
        // A few more turns of both agents: nothing is sent twice.
        std::thread::sleep(Duration::from_secs(3));
        for mut agent in agents {
            terminate(&mut agent);
        }
        let me = crate::cli_core::current_user();
        for kind in ["idle_warning", "idle_release", "expiry_warning"] {
            let events = hook.events(kind);
            assert_eq!(events.len(), 1, "{kind}: {events:?}");
            assert_eq!(events[0]["user"], me.as_str());
            assert!(events[0]["text"].as_str().unwrap().starts_with("your reservation of GPU(s) ["));
            assert_eq!(smtp.subjects(kind), 1, "{kind}");
        }
        assert_eq!(hook.events("idle_warning")[0]["gpus"], serde_json::json!([0]));
        assert_eq!(hook.events("expiry_warning")[0]["gpus"], serde_json::json!([1]));
        assert!(smtp.received.lock().unwrap().contains(&format!("To: {me}@example.com")));
        assert_eq!(terminal.lines("will be released if it stays idle"), 1);
        assert_eq!(terminal.lines("expires in"), 1);
        assert_eq!(refusing.seen.lock().unwrap().as_str(), "", "mesg n is respected");

        // Muted: the agent still logs, nobody is told.
        env.run(["notify", "--off"]).assert_ok();
        assert_eq!(
            env.run(["notify"]).stdout.trim(),
            format!("Notifications are off for {me}")
        );
        env.run(["reserve", "-G", "0", "-d", "10m"]).assert_ok();
        let mut quiet = agent(&env);
        std::thread::sleep(Duration::from_secs(3));
        terminate(&mut quiet);
        assert_eq!(hook.events("expiry_warning").len(), 1, "muted");
        env.run(["notify", "--on"]).assert_ok();
    },
}
