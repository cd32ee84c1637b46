"""The main job's CI check: the bundled paper-a and paper-b experiments, quick profile, end to end on the quick world.

`conceptlock reproduce --profile quick` is what the README's first line scales up; here it runs as CI runs it, two
stages at a time, and every stage, report and claim must come out."""

from __future__ import annotations

import json

from conceptlock.experiments.runner import run_experiment


def test_bundled_quick_profile_runs_every_stage_and_reports_every_claim(tmp_path, quick_world):
    out = tmp_path / "reproduce"
    plans = run_experiment(["paper-a", "paper-b"], "quick", out, world=quick_world, progress=False, jobs=2)
    assert [p.experiment.name for p in plans] == ["paper-a", "paper-b"]
    for plan in plans:
        assert all(s.is_done() for s in plan.stages if s.kind != "report"), plan.experiment.name
        rec = json.loads((plan.out / "experiment.json").read_text())
        assert rec["status"] == "done" and rec["profile"] == "quick" and rec["seeds"]["experiment"] == 0
        summary = json.loads((plan.out / "summary.json").read_text())
        want = [f"A{i}" for i in range(1, 6)] if plan.experiment.paper == "A" else [f"B{i}" for i in range(1, 8)]
        assert [c["id"] for c in summary["claims"]] == want
        assert {c["verdict"] for c in summary["claims"]} <= {
            "agrees",
            "disagrees",
            "inconclusive",
            "mixed",
            "partly agrees",
            "partly disagrees",
            "reference",
        }
        base = next(r for r in summary["rows"] if r["id"] == "base")
        harm = base["sets"]["explicit"]["metrics"]["toy_harm"]
        assert harm["n"] == 16 and harm["ci_low"] <= harm["value"] <= harm["ci_high"]
        # every malicious curve has its scheduled points, each scored with n and an interval
        for cid, curve in summary["curves"].items():
            assert [p["step"] for p in curve["points"]] == [0, 20], cid
    html = (out / "report.html").read_text()
    assert "paper-a" in html and "paper-b" in html and "<img" in html
