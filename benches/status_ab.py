#!/usr/bin/env python3
"""Interleaved A/B timing of `status` for two canhazgpu binaries on one store.

Usage: benches/status_ab.py OLD_BINARY NEW_BINARY -- GLOBAL_ARGS...
Runs `BINARY GLOBAL_ARGS status` alternately (old, new, old, ...) 300 times each after
20 warm-ups, so machine noise hits both alike; prints both medians and their ratio.
"""
import statistics
import subprocess
import sys
import time

old, new = sys.argv[1], sys.argv[2]
args = sys.argv[sys.argv.index("--") + 1:]
times = {old: [], new: []}
for i in range(320):
    for binary in (old, new):
        start = time.perf_counter()
        subprocess.run([binary, *args, "status"], stdout=subprocess.DEVNULL, check=True)
        if i >= 20:
            times[binary].append((time.perf_counter() - start) * 1000)
a, b = statistics.median(times[old]), statistics.median(times[new])
print(f"  status median: before {a:.2f} ms, after {b:.2f} ms, after/before {b / a:.2f}")
