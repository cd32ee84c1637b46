"""Issue 6's budget: wall time and peak RSS of `conceptlock reproduce` per profile, world build included.

Each step runs as its own process (what a user runs), timed from outside with the child's peak RSS from wait4:

    1. quick: conceptlock world build --profile quick
       full:  conceptlock world unpack (the full world ships in the package; --build times the 53-minute rebuild)
       (skipped with --world DIR: an existing world is reused)
    2. conceptlock reproduce [EXPERIMENTS] --profile P --jobs J --out OUT --quiet

    python benchmarks/bench_reproduce.py --profile quick --home /tmp/cl-bench --out runs/bench-quick
    python benchmarks/bench_reproduce.py --profile full --jobs 2 --home /tmp/cl-bench --out runs/bench-full

Targets (issue 6): quick <= 4 min and full <= 20 min on a 2-core CPU, world build included; complete (every row
at its larger budget, the full world unpacked) is measured without a target. Writes OUT/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path


def _tree_rss_sampler(pid: int, peak: list[float], stop: threading.Event) -> None:
    """Peak of the summed RSS of `pid` and its descendants (--jobs workers), sampled every 0.5 s."""
    try:
        import psutil
    except ImportError:
        return
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.wait(0.5):
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            break
        peak[0] = max(peak[0], total / 2**20)


def timed(cmd: list[str], env: dict[str, str]) -> dict:
    """Run `cmd`; wall seconds, exit status, the largest single process's peak RSS (wait4) and the peak of the
    whole process tree's summed RSS (psutil, sampled; None without psutil), in MiB."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    peak, stop = [0.0], threading.Event()
    sampler = threading.Thread(target=_tree_rss_sampler, args=(proc.pid, peak, stop), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    rc = os.waitstatus_to_exitcode(status)
    return {
        "cmd": " ".join(cmd),
        "rc": rc,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "peak_tree_rss_mib": round(peak[0], 1) if peak[0] else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="quick", choices=["quick", "full", "complete"])
    ap.add_argument("--home", type=Path, default=None, help="CONCEPTLOCK_HOME for the world (default: the user's)")
    ap.add_argument("--world", type=Path, default=None, help="reuse this world folder (no build step)")
    ap.add_argument("--out", type=Path, default=None, help="reproduce output (default runs/bench-PROFILE)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the children")
    ap.add_argument("--jobs", type=int, default=1, help="reproduce --jobs")
    ap.add_argument("--build", action="store_true", help="full: build the world instead of unpacking the shipped one")
    ap.add_argument("experiments", nargs="*", help="experiments (default: paper-a paper-b)")
    args = ap.parse_args()
    out = args.out or Path("runs") / f"bench-{args.profile}"
    env = dict(os.environ, TQDM_DISABLE="1")
    if args.home:
        env["CONCEPTLOCK_HOME"] = str(args.home)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    exe = [sys.executable, "-m", "conceptlock.cli"]
    steps = {}
    if args.world is None and args.profile in ("full", "complete") and not args.build:
        steps["world_unpack"] = timed([*exe, "world", "unpack"], env)
    elif args.world is None:
        world_profile = "quick" if args.profile == "quick" else "full"
        steps["world_build"] = timed([*exe, "world", "build", "--profile", world_profile], env)
    world = ["--world", str(args.world)] if args.world else []
    steps["reproduce"] = timed(
        [*exe, "reproduce", *args.experiments, "--profile", args.profile, "--jobs", str(args.jobs), "--out", str(out)]
        + [*world, "--quiet"],
        env,
    )
    total = sum(s["wall_s"] for s in steps.values())
    target = {"quick": 240, "full": 1200}.get(args.profile)  # complete: measured, no budget
    result = {
        "profile": args.profile,
        "jobs": args.jobs,
        "steps": steps,
        "total_wall_s": round(total, 1),
        "peak_rss_mib": max(s["peak_rss_mib"] for s in steps.values()),
        "peak_tree_rss_mib": max((s["peak_tree_rss_mib"] or 0) for s in steps.values()) or None,
        "target_s": target,
        "within_target": None if target is None else total <= target and args.world is None,
        "cpus": os.cpu_count(),
        "load_avg_after": os.getloadavg(),
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if any(s["rc"] for s in steps.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
