"""Issue 6's budget: wall time and peak RSS of `conceptlock reproduce` per profile, world build included.

Each step runs as its own process (what a user runs), timed from outside with the child's peak RSS from wait4:

    1. conceptlock world build --profile P        (skipped with --world DIR: an existing world is reused)
    2. conceptlock reproduce [EXPERIMENTS] --profile P --out OUT --quiet

    python benchmarks/bench_reproduce.py --profile quick --home /tmp/cl-bench --out runs/bench-quick
    python benchmarks/bench_reproduce.py --profile full --home /tmp/cl-bench --out runs/bench-full

Targets (issue 6): quick <= 4 min and full <= 20 min on a 2-core CPU, world build included. Writes OUT/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str], env: dict[str, str]) -> dict:
    """Run `cmd`; wall seconds, exit status and the child's peak RSS (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="quick", choices=["quick", "full"])
    ap.add_argument("--home", type=Path, default=None, help="CONCEPTLOCK_HOME for the world (default: the user's)")
    ap.add_argument("--world", type=Path, default=None, help="reuse this world folder (no build step)")
    ap.add_argument("--out", type=Path, default=None, help="reproduce output (default runs/bench-PROFILE)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the children")
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
    if args.world is None:
        steps["world_build"] = timed([*exe, "world", "build", "--profile", args.profile], env)
    world = ["--world", str(args.world)] if args.world else []
    steps["reproduce"] = timed(
        [*exe, "reproduce", *args.experiments, "--profile", args.profile, "--out", str(out), *world, "--quiet"], env
    )
    total = sum(s["wall_s"] for s in steps.values())
    target = {"quick": 240, "full": 1200}[args.profile]
    result = {
        "profile": args.profile,
        "steps": steps,
        "total_wall_s": round(total, 1),
        "peak_rss_mib": max(s["peak_rss_mib"] for s in steps.values()),
        "target_s": target,
        "within_target": total <= target and args.world is None,
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
