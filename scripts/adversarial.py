#!/usr/bin/env python3
"""Adversarial checks of the real binary, on both backends (issue: hardening).

Usage: scripts/adversarial.py [BINARY]     (default: target/release/canhazgpu)

Tries bad command lines, configuration files and environment values, corrupt stores,
and a storm of concurrent reservations with random `kill -9`s. Every process gets a
time limit. A private redis-server listens on a Unix socket in a temporary directory
and is stopped by its PID; nothing leaves the machine. Prints one line per category
(inputs tried, panics, hangs, other failures) and the storm's figures, and exits 1 when
anything went wrong: a panic or backtrace, a hang, an error longer than one line, a
success where an error was due, or a GPU granted twice.
"""

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

BINARY = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release/canhazgpu")
LIMIT = 15  # seconds any one invocation may take
work = tempfile.mkdtemp(prefix="chg-adversarial-")
env_base = {k: v for k, v in os.environ.items() if not k.startswith("CANHAZGPU_")}
env_base.update(HOME=os.path.join(work, "home"), CANHAZGPU_NVML="0", RUST_BACKTRACE="0",
                CANHAZGPU_HOST_NAME="adv")
os.makedirs(env_base["HOME"])
problems = []
counts = {}


def error_lines(err):
    """The lines of an error, less clap's "did you mean" tip under it."""
    lines = err.strip().splitlines()
    tips = ("  tip: a similar ", "  tip: some similar ")
    if len(lines) == 2 and lines[0].startswith("Error: ") and lines[1].startswith(tips):
        return lines[:1]
    return lines


def run(args, env=None, backend=None, stdin=None):
    """Runs the binary; returns (code, stdout, stderr) or None when it hung."""
    full = [BINARY] + (backend or []) + args
    try:
        done = subprocess.run(full, env={**env_base, **(env or {})}, capture_output=True,
                              text=True, errors="replace", timeout=LIMIT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None
    return done.returncode, done.stdout, done.stderr


def check(category, args, expect_failure=True, **kwargs):
    counts.setdefault(category, [0, 0, 0, 0])  # tried, panics, hangs, other
    counts[category][0] += 1
    result = run(args, **kwargs)
    if result is None:
        counts[category][2] += 1
        problems.append(f"{category}: hang: {args}")
        return None
    code, _out, err = result
    if "panicked" in err or "RUST_BACKTRACE" in err or code == 101 or code < 0:
        counts[category][1] += 1
        problems.append(f"{category}: panic ({code}): {args}: {err.strip()[:200]}")
    elif expect_failure and code == 0:
        counts[category][3] += 1
        problems.append(f"{category}: accepted: {args}")
    elif code != 0 and len(error_lines(err)) != 1:
        counts[category][3] += 1
        problems.append(f"{category}: not one line ({code}): {args}: {err.strip()[:200]}")
    return result


# --- servers and stores -----------------------------------------------------------
sock = os.path.join(work, "redis.sock")
redis = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", sock, "--save", "",
                          "--appendonly", "no", "--dir", work],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(200):
    if os.path.exists(sock):
        break
    time.sleep(0.02)


def redis_cli(*args):
    return subprocess.run(["redis-cli", "-s", sock, *args], capture_output=True, text=True).stdout


BACKENDS = {
    "sqlite": ["--backend", "sqlite", "--state-dir", os.path.join(work, "state")],
    "redis": ["--redis-url", f"redis+unix://{sock}"],
}


def fresh(backend):
    if backend == "redis":
        redis_cli("FLUSHALL")
    else:
        subprocess.run(["rm", "-rf", os.path.join(work, "state")])
    code, _, err = run(["admin", "--gpus", "4", "--provider", "fake"], backend=BACKENDS[backend])
    assert code == 0, err


try:
    # --- bad command lines ------------------------------------------------------------
    numbers = ["", "-1", "+1", "0", "1e3", "4294967296", "abc", " 1", "1,", ",", "1,,2",
               "99999999999999999999", "\u0661", "0x10", "1.5"]
    durations = ["", "0", "-5m", "1d1d", "1x", "99999999999d", "NaNh", "1.5.5h", "5", "h", "1h-"]
    texts = ["two\nlines", "x" * 1000, "\x1b[31mred"]
    command_lines = []
    for n in numbers:
        # 0 is a valid GPU ID, memory threshold, and (for `web`) "any free port";
        # 4294967296 MB is a valid (if silly) memory threshold.
        # 0 is a GPU ID, and ID lists may have spaces (`-G "1, 2"`).
        if n not in ("0", " 1"):
            command_lines += [["reserve", "-G", n], ["release", "-G", n],
                              ["extend", "-G", n, "1h"], ["transfer", "-G", n, "--to", "root"]]
        command_lines += [["adopt", n]]
        if n not in ("0", "4294967296"):
            command_lines += [["--memory-threshold", n, "status"]]
        command_lines += [["reserve", "--gpus", n],
                          ["run", "--gpus", n, "--", "true"], ["report", "--days", n],
                          ["admin", "--gpus", n, "--provider", "fake", "--force"],
                          # Port 0 is a valid request for any free port: left out.
                          ["web", "--port", n if n not in ("", "0") else "x", "--host", "127.0.0.1"],
                          ["--redis-port", n, "status"]]
    for d in durations:
        command_lines += [["reserve", "-d", d], ["reserve", "--wait", d, "--gpus", "9"],
                          ["run", "--timeout", d, "--", "true"],
                          # `--kill-grace 0` is valid: SIGKILL at once.
                          *([["run", "--kill-grace", d, "--", "true"]] if d != "0" else []),
                          ["extend", d], ["extend", "-G", "0", d],
                          ["run", "--heartbeat-interval", d, "--", "true"]]
    for t in texts:
        command_lines += [["reserve", "--note", t], ["reserve", "--user", t],
                          ["transfer", "-G", "0", "--to", t]]
    for when in ["", "25:00", "yesterday", "2001-01-01 10:00", "2999-01-01 10:00", "2026-13-01 10:00",
                 "18h"]:
        command_lines += [["reserve", "--until", when], ["extend", "--until", when]]
    command_lines += [["extend"], ["extend", "1h"], ["extend", "1h", "--until", "18:00"],
                      ["transfer", "-G", "0"], ["transfer", "--to", "root"],
                      ["transfer", "-G", "0", "--to", "no_such_user_x"], ["transfer", "-G", "0", "--to", ""],
                      ["adopt"], ["adopt", "1"], ["adopt", "999999999"], ["adopt", str(os.getpid())],
                      ["reserve", "--force", "--wait"], ["keep-adopted"], ["keep-adopted", "x", "0", "0", "0"]]
    command_lines += [["frobnicate"], ["reserve", "--gpu"], ["run", "true"], ["run", "--"],
                      ["release", "--force"], ["status", "--json", "extra"],
                      ["--redis-url", "http://x", "status"], ["--redis-url", "redis://:pw@h:x", "status"],
                      ["--backend", "mongo", "status"], ["--config", "/nonexistent.yaml", "status"],
                      ["--config", "/etc/passwd", "status"], ["--config", work, "status"],
                      ["reserve", "--gpus", "2", "-G", "0,1,2"], ["reserve", "--wait", "--nonblock"]]
    started = time.time()
    for backend in BACKENDS:
        fresh(backend)
        for args in command_lines:
            check(f"command lines ({backend})", args, backend=BACKENDS[backend])

    # --- bad configuration files and environment values ------------------------------
    bad_values = ["abc", "-1", "", "[1, 2]", "{}", "true", "99999999999999999999"]
    keys = ["backend", "state_dir", "redis.host", "redis.port", "redis.db", "redis.url",
            "redis.password", "redis.sentinels", "redis.sentinel_master", "memory.threshold",
            "history.retention_days", "run.wait", "reserve.wait", "smi_timeout", "nvml"]
    any_text = {"abc", "-1", "true", "99999999999999999999", "[1, 2]", "{}"}
    valid_for = {"state_dir": any_text, "redis.host": {"abc", "-1", "true", "99999999999999999999"},
                 "redis.password": any_text,
                 "redis.sentinel_master": {"abc", "-1", "true", "99999999999999999999", "{}"},
                 "run.wait": {"true"}, "reserve.wait": {"true"}, "nvml": {"true"}}
    for key, value in itertools.product(keys, bad_values):
        expect_failure = value not in valid_for.get(key, set())
        section, _, leaf = key.rpartition(".")
        doc = {section: {leaf: value}} if section else {leaf: value}
        path = os.path.join(work, "bad.json")
        with open(path, "w") as f:
            json.dump(doc, f)
        check("config files", ["--config", path, "status"], expect_failure=expect_failure,
              backend=["--state-dir", os.path.join(work, "state")])
        var = "CANHAZGPU_" + key.upper().replace(".", "_")
        if value:
            check("environment", ["status"], expect_failure=expect_failure, env={var: value},
                  backend=["--state-dir", os.path.join(work, "state")])
    for name, text in [("bad.yaml", "redis: [unclosed"), ("bad.toml", "redis = {port = }"),
                       ("bad.json", "{,}"), ("bad.ini", "x=1")]:
        path = os.path.join(work, name)
        with open(path, "w") as f:
            f.write(text)
        check("config files", ["--config", path, "status"])
    fifo = os.path.join(work, "fifo.yaml")
    os.mkfifo(fifo)
    check("config files", ["--config", fifo, "status"])

    # --- corrupt stores ----------------------------------------------------------------
    db = os.path.join(work, "state", "state.db")
    sqlite_damage = [
        "UPDATE meta SET value = '4294967295' WHERE key = 'gpu_count'",
        "UPDATE meta SET value = '-3' WHERE key = 'gpu_count'",
        "UPDATE meta SET value = 'tpu' WHERE key = 'provider'",
        "DELETE FROM meta WHERE key = 'provider'",
        "UPDATE gpus SET user = 'x', type = 'batch', start_time = 1 WHERE id = 1",
        "UPDATE gpus SET user = 'x', type = 'run' WHERE id = 2",
        "UPDATE gpus SET user = 'x', type = 'run', start_time = 1, host = 'h' WHERE id = 3",
        "UPDATE gpus SET user = 'x', type = 'manual', start_time = 1, expiry_time = 9223372036854775807 WHERE id = 0",
        "INSERT INTO queue (id, user, actual_user, type, requested_count, requested_ids, waiter_host, waiter_pid, waiter_pid_start, enqueue_time, last_heartbeat) VALUES ('q', 'x', 'x', 'run', 1, 'not json', 'h', 1, 1, 1, 1)",
        "INSERT INTO user_last_used VALUES ('root', -5, 1)",
        "INSERT INTO history (user, actual_user, gpu_id, start_time, end_time, type) VALUES ('x', 'x', 0, 9, 1, 'run')",
        "UPDATE meta SET value = '99' WHERE key = 'schema_version'",
    ]
    redis_damage = [
        ["SET", "canhazgpu:{adv}:gpu_count", "4294967295"], ["SET", "canhazgpu:{adv}:gpu_count", "many"],
        ["RPUSH", "canhazgpu:{adv}:gpu_count", "a"], ["SET", "canhazgpu:{adv}:provider", "tpu"],
        ["SADD", "canhazgpu:{adv}:provider", "x"], ["RPUSH", "canhazgpu:{adv}:gpu:3", "a", "b"],
        ["HSET", "canhazgpu:{adv}:gpu:1", "a", "b"], ["SET", "canhazgpu:{adv}:gpu:0", "{not json"],
        ["SET", "canhazgpu:{adv}:gpu:2", '{"user": 5}'], ["SET", "canhazgpu:{adv}:queue", "x"],
        ["ZADD", "canhazgpu:{adv}:queue", "1", "ghost"], ["SET", "canhazgpu:{adv}:queue:entry:ghost", "[]"],
        ["SADD", "canhazgpu:{adv}:user_last_used:root", "x"],
        ["SET", "canhazgpu:{adv}:usage_history_sorted", "x"],
        # The fleet's registry and this host's published snapshot.
        ["SET", "canhazgpu:hosts", "x"], ["HSET", "canhazgpu:hosts", "adv", "{bad"],
        ["HSET", "canhazgpu:hosts:reported", "adv", "soon"],
        ["SET", "canhazgpu:{adv}:snapshot", "{not json"], ["HSET", "canhazgpu:{adv}:snapshot", "a", "b"],
    ]
    actions = [["status"], ["status", "--json"], ["reserve", "-d", "1m"], ["release"],
               ["report"], ["queue"], ["reserve", "-G", "3"], ["release", "-G", "3", "--force"]]
    for damage in sqlite_damage:
        fresh("sqlite")
        subprocess.run(["sqlite3", db, damage], check=True)
        for action in actions:
            check("corrupt stores (sqlite)", action, expect_failure=False,
                  backend=BACKENDS["sqlite"])
    for damage in redis_damage:
        fresh("redis")
        redis_cli(*damage)
        for action in actions:
            check("corrupt stores (redis)", action, expect_failure=False,
                  backend=BACKENDS["redis"])
        if redis_cli("PING").strip() != "PONG":
            problems.append(f"corrupt stores (redis): server stalled after {damage}")

    # --- a storm of reservations with random kill -9 -----------------------------------
    storm = {}
    rng = random.Random(8)
    for backend in BACKENDS:
        fresh(backend)
        run(["admin", "--gpus", "8", "--provider", "fake", "--force"], backend=BACKENDS[backend])
        procs, killed = [], 0
        for i in range(150):
            kind = rng.choice(["reserve", "reserve", "run", "status", "queue"])
            args = {"reserve": ["reserve", "--gpus", str(rng.randint(1, 3)), "-d", "1h", "--short"],
                    "run": ["run", "--gpus", "1", "--", "sleep", "0.2"],
                    "status": ["status", "--json"], "queue": ["queue", "--json"]}[kind]
            p = subprocess.Popen([BINARY] + BACKENDS[backend] + args, env=env_base,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append((kind, p))
            if rng.random() < 0.15:
                victim = rng.choice(procs)[1]
                if victim.poll() is None:
                    victim.send_signal(signal.SIGKILL)
                    killed += 1
        granted, failed_badly = [], 0
        for kind, p in procs:
            try:
                out, err = p.communicate(timeout=LIMIT)
            except subprocess.TimeoutExpired:
                p.kill()
                problems.append(f"storm ({backend}): hang: {kind}")
                continue
            if "panicked" in err:
                failed_badly += 1
                problems.append(f"storm ({backend}): panic: {err.strip()[:200]}")
            if kind == "reserve" and p.returncode == 0:
                granted += [int(x) for x in out.strip().split(",")]
        # Manual reservations are never released here (only `run`s end, and free
        # their GPUs): a GPU granted to two manual reservations is a double allocation.
        doubles = len(granted) - len(set(granted))
        if doubles:
            problems.append(f"storm ({backend}): {doubles} GPUs granted twice: {sorted(granted)}")
        # Every reservation that was granted is still there: none lost.
        code, out, _ = run(["status", "--json"], backend=BACKENDS[backend])
        held = {row["gpu_id"] for row in json.loads(out) if row["status"] == "IN_USE"}
        lost = set(granted) - held
        if code != 0 or lost:
            problems.append(f"storm ({backend}): granted but no longer held: {sorted(lost)}")
        storm[backend] = (150, killed, len(set(granted)), doubles, len(lost), failed_badly)
finally:
    redis.send_signal(signal.SIGTERM)
    redis.wait(timeout=10)
    subprocess.run(["rm", "-rf", work])

for category, (tried, panics, hangs, other) in counts.items():
    print(f"{category}: {tried} tried, {panics} panics, {hangs} hangs, {other} other failures")
for backend, (ops, killed, granted, doubles, lost, panics) in storm.items():
    print(f"storm ({backend}): {ops} operations, {killed} killed with SIGKILL, {granted} GPUs "
          f"granted, {doubles} granted twice, {lost} lost, {panics} panics")
for problem in problems[:40]:
    print("PROBLEM", problem)
tried = sum(c[0] for c in counts.values()) + sum(ops for ops, *_ in storm.values())
print(f"adversarial: {tried - len(problems)} passed, {len(problems)} failed")
sys.exit(1 if problems else 0)
