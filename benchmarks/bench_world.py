"""Wall time and peak RSS of `conceptlock world build` per profile (the issue's cost budget).

Each build runs in a fresh subprocess into a temporary folder (`--force`), so nothing is cached;
peak RSS is the child's maximum resident set size. Prints a table; not a test.

    python benchmarks/bench_world.py --profiles quick full
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET = {"quick": (120, 4.0), "full": (720, 4.0)}  # seconds, GiB


def run(profile: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "world"
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "conceptlock.cli",
                "world",
                "build",
                "--profile",
                profile,
                "--seed",
                str(seed),
                "--out",
                str(out),
                "--force",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            env={**__import__("os").environ, "TQDM_DISABLE": "1"},
        )
        wall = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        meta = json.loads((out / "world.json").read_text())
        return {
            "profile": profile,
            "wall_s": wall,
            "peak_rss_gib": max(rss, before) / 2**20,
            "stages": meta["timings_s"],
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", nargs="+", default=["quick"], choices=sorted(BUDGET))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = [run(p, args.seed) for p in args.profiles]
    print(f"{'profile':8} {'wall s':>8} {'budget s':>9} {'peak RSS GiB':>13} {'budget GiB':>11}  stages (s)")
    for r in rows:
        wb, mb = BUDGET[r["profile"]]
        stages = ", ".join(f"{k} {v}" for k, v in r["stages"].items() if k != "vae_recon_mse")
        print(f"{r['profile']:8} {r['wall_s']:8.1f} {wb:9d} {r['peak_rss_gib']:13.2f} {mb:11.1f}  {stages}")


if __name__ == "__main__":
    main()
