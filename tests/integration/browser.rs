//! The dashboard in a real headless Chromium against a real `canhazgpu web`: the
//! rendered DOM must show the GPU cards, badges, report and hostname, and show markup
//! in process and model names as literal text, and with several hosts the fleet's
//! overview and one host's drill-down. Screenshots are saved under
//! `target/test-artifacts/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use canhazgpu::state::ReservationKind::{Manual, Run};

use crate::cli_gpu::GpuJob;
use crate::support::cli::CliEnv;
use crate::support::fake_smi::FakeSmi;
use crate::support::fleet::Fleet;
use crate::support::history::{HOUR, History, now};
use crate::support::redis::TestRedis;
use crate::support::web::WebServer;

const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(120);
const PROCESS_NAME: &str = "<img src=x onerror=alert(1)>";
const MODEL: &str = "evil<b>/<img/src=x/onerror=alert(2)>";

/// Runs headless Chromium with a fresh profile; scripts get 5 s of virtual time.
fn chromium(args: &[String]) -> Output {
    crate::support::require("chromium");
    let profile = tempfile::tempdir().expect("profile dir");
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium (scripts/test.sh installs it)");
    let deadline = Instant::now() + CHROMIUM_TIMEOUT;
    while child.try_wait().expect("wait for chromium").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within {CHROMIUM_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("chromium output");
    assert!(output.status.success(), "chromium failed: {output:?}");
    output
}

pub fn rendered_dom(url: &str) -> String {
    let output = chromium(&["--dump-dom".into(), url.into()]);
    String::from_utf8(output.stdout).expect("UTF-8 DOM")
}

fn artifacts() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir");
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

/// Saves a screenshot at the given window size and checks it is a PNG.
fn screenshot(url: &str, name: &str, width: u32, height: u32) -> PathBuf {
    let path = artifacts().join(name);
    let _ = std::fs::remove_file(&path);
    chromium(&[
        format!("--screenshot={}", path.display()),
        format!("--window-size={width},{height}"),
        "--hide-scrollbars".into(),
        url.into(),
    ]);
    let png = std::fs::read(&path).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);
    path
}

#[track_caller]
pub fn assert_contains(dom: &str, wanted: &str) {
    assert!(dom.contains(wanted), "{wanted:?} is not in the DOM:\n{dom}");
}

#[test]
fn dashboard_shows_cards_badges_report_and_markup_as_text() {
    let mut env = CliEnv::sqlite();
    let mut smi = FakeSmi::nvidia(env.dir.path(), 4);
    env.path_prefix.push(smi.path_dir());
    env.run(["admin", "--gpus", "4"]).assert_ok();
    env.run(["reserve", "--gpu-ids", "0", "--duration", "2h"])
        .assert_ok();
    let t = now();
    let mut history = History::open(&env);
    history.finished("alice", 1, Manual, t - 30 * HOUR, t - 24 * HOUR);
    history.finished("bob", 3, Run, t - 5 * HOUR, t - 2 * HOUR);
    history.finished("carol", 1, Manual, t - 50 * HOUR, t - 49 * HOUR);
    // A job nobody reserved, whose process name and model are markup.
    let job = GpuJob::start(&["--model", MODEL]);
    smi.set_memory(2, 30_000)
        .add_process(2, job.pid(), PROCESS_NAME, 29_000);

    let server = WebServer::start(&env, 5);
    let dom = rendered_dom(&server.url("/"));

    let hostname = server.get_json("/api/info", 200)["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    assert_contains(&dom, &format!(r#"id="hostname">{hostname}</div>"#));
    assert_eq!(dom.matches(r#"<article class="card "#).count(), 4, "{dom}");
    assert_contains(
        &dom,
        r#"<article class="card in-use" data-gpu="0" data-status="IN_USE">"#,
    );
    assert_contains(
        &dom,
        r#"<article class="card available" data-gpu="1" data-status="AVAILABLE">"#,
    );
    assert_contains(
        &dom,
        r#"<article class="card unreserved" data-gpu="2" data-status="UNRESERVED">"#,
    );
    assert_contains(&dom, r#"<span class="badge in-use">IN USE</span>"#);
    assert_contains(&dom, r#"<span class="badge available">AVAILABLE</span>"#);
    assert_contains(&dom, r#"<span class="badge unreserved">UNRESERVED</span>"#);
    assert_contains(&dom, "<dt>Type</dt><dd>MANUAL</dd>");
    assert_contains(&dom, r#"<div class="gpu-model">H100 80GB HBM3</div>"#);
    // The markup is shown as text, never parsed.
    assert_contains(
        &dom,
        &format!(
            "30000MB used by PID {} (&lt;img src=x onerror=alert(1)&gt;)",
            job.pid()
        ),
    );
    assert_contains(
        &dom,
        "<dd class=\"mono\">evil&lt;b&gt;/&lt;img/src=x/onerror=alert(2)&gt;</dd>",
    );
    assert!(!dom.contains("<img"), "markup was rendered as HTML:\n{dom}");
    // The report: one bar per user, busiest first, and the period selector.
    let alice = dom.find(r#"data-user="alice""#).expect("alice's row");
    let bob = dom.find(r#"data-user="bob""#).expect("bob's row");
    let carol = dom.find(r#"data-user="carol""#).expect("carol's row");
    assert!(alice < bob && bob < carol, "rows sorted by hours");
    assert_contains(&dom, "6.00 h");
    assert_contains(&dom, r#"<option value="1">1 day</option>"#);
    assert_contains(&dom, r#"<option value="90">90 days</option>"#);
    assert_contains(&dom, r#"id="banner" role="alert" hidden="""#);
    assert_contains(&dom, r#"href="/README.md""#);
    // One host: no fleet overview, no fleet report.
    assert_contains(
        &dom,
        r#"<section id="hosts-section" aria-labelledby="hosts-title" hidden="">"#,
    );
    assert_contains(
        &dom,
        r#"<section id="fleet-report-section" aria-labelledby="fleet-report-title" hidden="">"#,
    );

    screenshot(&server.url("/"), "dashboard.png", 1280, 900);
    screenshot(&server.url("/"), "dashboard-phone.png", 390, 844);
}

/// The `<tr>` of host `name` in the hosts overview.
fn host_row<'a>(dom: &'a str, name: &str) -> &'a str {
    let start = dom
        .find(&format!(r#"data-host="{name}">"#))
        .unwrap_or_else(|| panic!("no overview row for {name}:\n{dom}"));
    let row = &dom[start..];
    &row[..row.find("</tr>").expect("end of the row")]
}

#[test]
fn dashboard_shows_the_fleet_with_a_stale_host_and_drills_into_one() {
    let fleet = Fleet::launch();
    let a = fleet.host_with("a", 2);
    let b = fleet.host_with("b", 3);
    fleet.host_with("c", 1);
    b.run(["reserve", "--gpu-ids", "1", "-d", "1h"]).assert_ok();
    b.run(["status"]).assert_ok();
    let t = now();
    History::open(&b).finished("bob", 2, Run, t - 3 * HOUR, t - HOUR);
    fleet.age_snapshot("c", 303);
    let server = WebServer::start(&a, 5);

    let dom = rendered_dom(&server.url("/"));
    assert_contains(
        &dom,
        r#"<section id="hosts-section" aria-labelledby="hosts-title">"#,
    );
    let stale = r#"<span class="badge stale">NOT REPORTING</span>"#;
    let row_a = host_row(&dom, "a");
    assert!(!row_a.contains(stale), "{row_a}");
    assert_contains(row_a, r#"<span class="chip">this host</span>"#);
    assert_contains(
        row_a,
        r#"<td class="num">2</td><td class="num free">2</td><td class="num">0</td><td>2 Fake GPU</td>"#,
    );
    let row_b = host_row(&dom, "b");
    assert!(!row_b.contains(stale), "{row_b}");
    assert_contains(
        row_b,
        r##"<a href="#host=b">b</a></td><td class="num">3</td><td class="num free">2</td><td class="num">1</td><td>3 Fake GPU</td>"##,
    );
    let row_c = host_row(&dom, "c");
    assert_contains(row_c, stale);
    assert_contains(row_c, r#"<td class="num none">0</td>"#);
    // Without a choice in the URL, the drill-down is this host.
    assert_contains(&dom, r#"<tr class="selected" data-host="a">"#);
    assert_eq!(dom.matches(r#"<article class="card "#).count(), 2, "{dom}");
    assert_contains(
        &dom,
        r#"GPU status<span class="on-host" data-scope=""> · a</span>"#,
    );
    // The fleet report: every host, bob's hours on b.
    assert_contains(
        &dom,
        r#"<section id="fleet-report-section" aria-labelledby="fleet-report-title">"#,
    );
    for host in ["a", "b", "c"] {
        assert_contains(&dom, &format!(r#"<tr data-report-host="{host}">"#));
    }
    let fleet_report = dom.split(r#"id="fleet-report""#).nth(1).unwrap();
    assert_contains(fleet_report, r#"data-user="bob""#);

    let dom = rendered_dom(&server.url("/#host=b"));
    assert_contains(&dom, r#"<tr class="selected" data-host="b">"#);
    assert_eq!(dom.matches(r#"<article class="card "#).count(), 3, "{dom}");
    assert_contains(
        &dom,
        r#"<article class="card in-use" data-gpu="1" data-status="IN_USE">"#,
    );
    assert_contains(
        &dom,
        r#"Queue<span class="on-host" data-scope=""> · b</span>"#,
    );
    assert_contains(&dom, "Nobody is waiting for GPUs.");
    let host_report = dom
        .split(r#"id="report""#)
        .nth(1)
        .unwrap()
        .split(r#"id="fleet-report""#)
        .next()
        .unwrap();
    assert_contains(host_report, r#"data-user="bob""#);
    screenshot(&server.url("/#host=b"), "dashboard-fleet.png", 1280, 1100);

    let dom = rendered_dom(&server.url("/#host=c"));
    assert_contains(&dom, r#"<tr class="selected" data-host="c">"#);
    assert_eq!(dom.matches(r#"<article class="card "#).count(), 1, "{dom}");
    assert_contains(&dom, "<dt>Validation</dt><dd>host not reporting for 0h 5m");
    // Its report has none of bob's hours on b.
    let host_report = dom.split(r#"id="report""#).nth(1).unwrap();
    let host_report = host_report.split(r#"id="fleet-report""#).next().unwrap();
    assert!(!host_report.contains(r#"data-user="bob""#), "{host_report}");
    // A host the fleet does not have: this host, as without a choice.
    let dom = rendered_dom(&server.url("/#host=zz"));
    assert_contains(&dom, r#"<tr class="selected" data-host="a">"#);
    assert_contains(&dom, r#"id="banner" role="alert" hidden="""#);
}

#[test]
fn dashboard_says_when_the_store_is_unreachable() {
    let mut redis = TestRedis::launch();
    let env = CliEnv::redis(&redis.url());
    env.init_fake(2);
    let server = WebServer::start(&env, 1);
    assert_contains(&rendered_dom(&server.url("/")), r#"data-gpu="1""#);

    redis.stop();
    std::thread::sleep(Duration::from_millis(1100));
    let dom = rendered_dom(&server.url("/"));
    // The banner holds one line per failing source (status, report), in either order.
    let banner = dom
        .split(r#"<div class="banner" id="banner" role="alert""#)
        .nth(1)
        .expect("the banner");
    let (opening, content) = banner.split_once('>').expect("banner tag");
    assert!(!opening.contains("hidden"), "banner hidden: {opening}");
    let status_line = content
        .split("<div>")
        .find(|line| line.starts_with("GPU status unavailable: "))
        .unwrap_or_else(|| panic!("no status line in the banner: {content}"));
    assert!(status_line.contains("Redis"), "{status_line}");
    screenshot(&server.url("/"), "dashboard-store-down.png", 1280, 600);
}

#[test]
fn dashboard_shows_ends_measurements_squatters_adopted_jobs_and_the_idlest_holders() {
    crate::multi_user::ensure_user("chg_bob");
    let mut env = CliEnv::sqlite();
    let mut smi = FakeSmi::nvidia(env.dir.path(), 3);
    env.path_prefix.push(smi.path_dir());
    env.run(["admin", "--gpus", "3"]).assert_ok();
    env.run(["reserve", "--gpu-ids", "0,1", "--duration", "2h"])
        .assert_ok();
    let bobs = crate::follow::BobsJob::start();
    let job = GpuJob::start(&[]);
    smi.set_utilization(1, 70)
        .set_memory(1, 9_000)
        .add_process(1, bobs.pid(), "sleep", 8_000)
        .set_memory(2, 20_000)
        .add_process(2, job.pid(), "python3", 19_000);
    env.run(["adopt", &job.pid().to_string()]).assert_ok();
    // Two agent turns measure the reservations.
    let mut agent = env
        .command(["agent", "--interval", "1s"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(crate::support::cli::wait_until(
        std::time::Duration::from_secs(15),
        || env.status_json()[0]["idle_seconds"]
            .as_i64()
            .is_some_and(|idle| idle >= 1)
    ));
    let _ = agent.kill();
    let _ = agent.wait();

    let server = WebServer::start(&env, 1);
    let dom = rendered_dom(&server.url("/"));
    assert_contains(&dom, "<dt>Ends</dt>");
    assert_contains(&dom, "<dt>Utilization</dt><dd>70%</dd>");
    assert_contains(&dom, "<dt>Also used by</dt><dd>chg_bob</dd>");
    assert_contains(
        &dom,
        &format!("<dt>Adopted PID</dt><dd class=\"mono\">{}</dd>", job.pid()),
    );
    assert_contains(&dom, "<h3>Idlest holders</h3>");
    assert_contains(&dom, r#"<div class="panel idlest" id="idlest">"#);
    assert_contains(&dom, "GPU 0: idle 0h 0m");
    screenshot(&server.url("/"), "dashboard-activity.png", 1280, 900);
}
