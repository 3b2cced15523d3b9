//! What people are told, and how. Each event is sent once per fleet: the process
//! whose transaction recorded it (the agent's turn, the waiter that was served, the
//! `transfer` or `release --force` that made it) is the one that sends it. Channels,
//! each off unless the administrator configured it (`notify.*`, system file only):
//! the user's terminals (as `write` does, respecting `mesg n`), one webhook, and
//! e-mail through an SMTP relay. Users mute their own with `canhazgpu notify --off`.
//! Sending never blocks the caller: it happens on a background thread, with
//! timeouts and retries.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::gpu_status::format_hours_minutes;
use crate::output::id_list;
use crate::state::{Reservation, UnixTime};
use crate::store::{Noticed, Store};

/// One thing that happened to someone's reservation, as the webhook receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    /// `queue_served`, `expiry_warning`, `idle_warning`, `idle_release`, `idle_run`,
    /// `squatter`, `transferred`, `ended_by_root`.
    pub event: &'static str,
    pub host: String,
    pub user: String,
    pub gpus: Vec<u32>,
    /// The message itself; also what Slack, Mattermost and Teams incoming webhooks show.
    pub text: String,
}

/// The channels the administrator configured (`notify.*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Channels {
    /// `notify.terminals`: a line on each of the user's terminals.
    pub terminals: bool,
    /// `notify.webhook_url`: a JSON POST of each event.
    pub webhook_url: Option<String>,
    /// `notify.smtp.*`: e-mail through this relay.
    pub smtp: Option<Smtp>,
    /// `notify.expiry_warning`: how long before its end a manual reservation's
    /// holder is told, in seconds.
    pub expiry_warning: u64,
}

/// `notify.expiry_warning` when unset: 15 minutes.
pub const DEFAULT_EXPIRY_WARNING_SECS: u64 = 15 * 60;

impl Default for Channels {
    fn default() -> Self {
        Channels {
            terminals: false,
            webhook_url: None,
            smtp: None,
            expiry_warning: DEFAULT_EXPIRY_WARNING_SECS,
        }
    }
}

/// An SMTP relay that accepts mail for the users without authentication (port 25
/// inside the site).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Smtp {
    pub host: String,
    pub port: u16,
    pub from: String,
    /// The address of a user: `{user}` is replaced by the Unix user name.
    pub to: String,
}

/// Where the logged-in users' terminals are listed.
const UTMP: &str = "/var/run/utmp";
/// Names another utmp file (tests); ignored while canhazgpu runs setgid or setuid.
pub const UTMP_ENV: &str = "CANHAZGPU_UTMP";

const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
const WEBHOOK_ATTEMPTS: u32 = 3;
const SMTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The events of one agent turn.
pub fn noticed_events(noticed: &Noticed, host: &str, now: UnixTime) -> Vec<Event> {
    let mut events = Vec::new();
    let idle_of = |r: &Reservation| {
        format_hours_minutes(r.activity.as_ref().map_or(0, |a| now - a.last_active))
    };
    let groups: [(&'static str, &[(u32, Reservation)]); 4] = [
        ("idle_warning", &noticed.idle_warned),
        ("idle_release", &noticed.idle_released),
        ("idle_run", &noticed.idle_runs),
        ("expiry_warning", &noticed.expiring),
    ];
    for (event, entries) in groups {
        for (reservation, gpus) in by_reservation(entries) {
            let list = id_list(&gpus);
            let text = match event {
                "idle_warning" => format!(
                    "your reservation of GPU(s) {list} on {host} has been idle for {}; it will be released if it stays idle",
                    idle_of(reservation)
                ),
                "idle_release" => format!(
                    "your reservation of GPU(s) {list} on {host} was released after being idle for {} (policy.idle_release_after)",
                    idle_of(reservation)
                ),
                "idle_run" => format!(
                    "your run on GPU(s) {list} on {host} has been idle for {}",
                    idle_of(reservation)
                ),
                _ => format!(
                    "your reservation of GPU(s) {list} on {host} expires in {}",
                    format_hours_minutes(reservation.expiry_time.map_or(0, |end| end - now))
                ),
            };
            events.push(Event {
                event,
                host: host.to_string(),
                user: crate::pool::account(&reservation.user, &reservation.actual_user),
                gpus,
                text,
            });
        }
    }
    for (gpu, reservation, squatters) in &noticed.squatters {
        let who: Vec<String> = squatters
            .iter()
            .map(|(user, pid)| format!("{user} (PID {pid})"))
            .collect();
        events.push(Event {
            event: "squatter",
            host: host.to_string(),
            user: crate::pool::account(&reservation.user, &reservation.actual_user),
            gpus: vec![*gpu],
            text: format!(
                "GPU {gpu} on {host}, reserved by you, is also used by {}",
                who.join(", ")
            ),
        });
    }
    events
}

/// The GPUs of each reservation among `entries`, in order.
fn by_reservation(entries: &[(u32, Reservation)]) -> Vec<(&Reservation, Vec<u32>)> {
    let mut groups: Vec<(&Reservation, Vec<u32>)> = Vec::new();
    for (gpu, reservation) in entries {
        let same =
            |r: &&Reservation| r.id == reservation.id && r.actual_user == reservation.actual_user;
        match groups.iter_mut().find(|(r, _)| same(r)) {
            Some((_, gpus)) => gpus.push(*gpu),
            None => groups.push((reservation, vec![*gpu])),
        }
    }
    groups
}

/// How long a command that ends right after an event waits for its delivery.
pub const DELIVERY_WAIT: Duration = Duration::from_secs(3);

/// Sends `events` on every configured channel, except to users who muted theirs,
/// on a background thread; `log` also writes each to stderr (the agent's log).
/// Returns what says when it is done, for a short-lived caller to wait for a while
/// (`finish`).
pub fn send(
    config: &Config,
    store: &mut dyn Store,
    events: Vec<Event>,
    log: bool,
) -> Option<std::sync::mpsc::Receiver<()>> {
    if events.is_empty() {
        return None;
    }
    if log {
        for event in &events {
            eprintln!("canhazgpu: {} {}: {}", event.event, event.user, event.text);
        }
    }
    let channels = config.notify.clone();
    if !channels.terminals && channels.webhook_url.is_none() && channels.smtp.is_none() {
        return None;
    }
    // A store that cannot say who muted themselves must not silence everyone.
    let muted = store.muted_users().unwrap_or_default();
    let events: Vec<Event> = events
        .into_iter()
        .filter(|event| !muted.contains(&event.user))
        .collect();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("notify".into())
        .spawn(move || {
            for event in &events {
                deliver(&channels, event);
            }
            let _ = done.send(());
        })
        .ok()?;
    Some(finished)
}

/// Waits up to `DELIVERY_WAIT` for what `send` started; a slow channel is given up
/// rather than holding the command.
pub fn finish(sending: Option<std::sync::mpsc::Receiver<()>>) {
    if let Some(finished) = sending {
        let _ = finished.recv_timeout(DELIVERY_WAIT);
    }
}

fn deliver(channels: &Channels, event: &Event) {
    if channels.terminals {
        to_terminals(&event.user, &event.text);
    }
    if let Some(url) = &channels.webhook_url
        && let Err(e) = to_webhook(url, event)
    {
        eprintln!("canhazgpu: webhook {url}: {e}");
    }
    if let Some(smtp) = &channels.smtp
        && let Err(e) = to_mail(smtp, event)
    {
        eprintln!("canhazgpu: mail through {}:{}: {e}", smtp.host, smtp.port);
    }
}

/// A short line on each terminal `user` is logged in on, as `write` does: only
/// terminals whose owner allows messages (`mesg y`: group-writable).
fn to_terminals(user: &str, text: &str) {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let utmp = match std::env::var_os(UTMP_ENV) {
        Some(path) if !crate::privilege::set_id() => PathBuf::from(path),
        _ => PathBuf::from(UTMP),
    };
    let Ok(records) = std::fs::read(&utmp) else {
        return;
    };
    let Some(uid) = nix::unistd::User::from_name(user)
        .ok()
        .flatten()
        .map(|u| u.uid)
    else {
        return;
    };
    for line in logins(&records, user) {
        let device = PathBuf::from("/dev").join(&line);
        let Ok(meta) = std::fs::metadata(&device) else {
            continue;
        };
        // Only the user's own terminal, and only with `mesg y`.
        if meta.uid() != uid.as_raw() || meta.mode() & 0o020 == 0 {
            continue;
        }
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_NONBLOCK)
            .open(&device);
        if let Ok(mut tty) = opened {
            let clean: String = text.chars().filter(|c| !c.is_control()).collect();
            let _ = write!(tty, "\r\n\x07canhazgpu: {clean}\r\n");
        }
    }
}

/// The terminal lines (`pts/3`) of `user`'s login records in a utmp file (glibc's
/// 384-byte `struct utmp`: type at 0, line at 8, user at 44).
fn logins(records: &[u8], user: &str) -> Vec<String> {
    const RECORD: usize = 384;
    const USER_PROCESS: i32 = 7;
    let text = |bytes: &[u8]| {
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    };
    records
        .chunks_exact(RECORD)
        .filter(|r| i32::from_ne_bytes([r[0], r[1], r[2], r[3]]) == USER_PROCESS)
        .filter(|r| text(&r[44..76]) == user)
        .map(|r| text(&r[8..40]))
        .filter(|line| !line.is_empty() && !line.contains("..") && !line.starts_with('/'))
        .collect()
}

/// A JSON POST, retried with a growing pause; any 2xx is delivered.
fn to_webhook(url: &str, event: &Event) -> Result<(), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(WEBHOOK_TIMEOUT))
        .build()
        .into();
    let body = serde_json::to_string(event).map_err(|e| e.to_string())?;
    let mut last = String::new();
    for attempt in 0..WEBHOOK_ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1 << attempt));
        }
        match agent
            .post(url)
            .header("Content-Type", "application/json")
            .send(body.as_str())
        {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// One message through the relay: plain SMTP (EHLO, MAIL, RCPT, DATA).
fn to_mail(smtp: &Smtp, event: &Event) -> Result<(), String> {
    let to = smtp.to.replace("{user}", &event.user);
    let stream = TcpStream::connect((smtp.host.as_str(), smtp.port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(SMTP_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(SMTP_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut writer = stream;
    let expect = |reader: &mut BufReader<TcpStream>, code: &str| -> Result<(), String> {
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).map_err(|e| e.to_string())?;
            if !line.starts_with(code) {
                return Err(format!("the relay answered {:?}", line.trim_end()));
            }
            // `250-...` continues, `250 ...` ends the reply.
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(());
            }
        }
    };
    let say = |writer: &mut TcpStream, line: &str| {
        writer
            .write_all(format!("{line}\r\n").as_bytes())
            .map_err(|e| e.to_string())
    };
    expect(&mut reader, "220")?;
    say(
        &mut writer,
        &format!("EHLO {}", crate::gpu::procinfo::hostname()),
    )?;
    expect(&mut reader, "250")?;
    say(&mut writer, &format!("MAIL FROM:<{}>", smtp.from))?;
    expect(&mut reader, "250")?;
    say(&mut writer, &format!("RCPT TO:<{to}>"))?;
    expect(&mut reader, "250")?;
    say(&mut writer, "DATA")?;
    expect(&mut reader, "354")?;
    let text: String = event.text.chars().filter(|c| !c.is_control()).collect();
    let message = format!(
        "From: {}\r\nTo: {to}\r\nSubject: canhazgpu: {} on {}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n.",
        smtp.from, event.event, event.host
    );
    say(&mut writer, &message)?;
    expect(&mut reader, "250")?;
    say(&mut writer, "QUIT")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: i32, line: &str, user: &str) -> Vec<u8> {
        let mut r = vec![0u8; 384];
        r[0..4].copy_from_slice(&kind.to_ne_bytes());
        r[8..8 + line.len()].copy_from_slice(line.as_bytes());
        r[44..44 + user.len()].copy_from_slice(user.as_bytes());
        r
    }

    #[test]
    fn logins_are_read_from_utmp_records() {
        let mut utmp = record(7, "pts/3", "alice");
        utmp.extend(record(8, "pts/4", "alice")); // a dead process
        utmp.extend(record(7, "pts/5", "bob"));
        utmp.extend(record(7, "../etc/passwd", "alice"));
        utmp.extend(record(7, "tty1", "alice"));
        assert_eq!(logins(&utmp, "alice"), vec!["pts/3", "tty1"]);
        assert!(
            logins(&utmp[..100], "alice").is_empty(),
            "a torn record is ignored"
        );
    }
}
