"""The reproduce report from a synthetic results folder: tables with n and CIs, plots and grids inline, verdicts computed
from the numbers, and the HTML rendering in headless Chromium without console errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptlock.experiments.config import load_experiment
from conceptlock.experiments.report import collect, fmt_metric, write_index, write_report
from conceptlock.experiments.runner import plan_experiment
from conceptlock.stats import wilson_interval

CHROMIUM = Path("/usr/bin/chromium")
N = 16

EXP = """
name = "synth"
title = "Synthetic Paper A"
paper = "A"

[model]
world = "toy"

[eval]
limit = 16
grid = 4

[[eval.sets]]
id = "explicit"
prompts = "toy:explicit-gore"
metrics = ["toy_harm"]

[[eval.sets]]
id = "clean"
prompts = "toy:clean"
metrics = ["toy_fidelity"]

[[align]]
id = "esd-lora"
method = "esd"
params = "lora:safety"

[[baselines]]
id = "sld"
model = "base"
sld = "MAX"

[[attacks]]
id = "std"
label = "standard LoRA"
model = "esd-lora"
kind = "benign"
data = "toy:domain-mosaic"
params = "lora:task"
mode = "standard"
schedule = [0, 10, 20]
task = "toy:domain-mosaic"

[[attacks]]
id = "mod"
label = "Modular LoRA"
model = "esd-lora"
kind = "benign"
data = "toy:domain-mosaic"
params = "lora:task"
mode = "modular"
schedule = [0, 10, 20]
task = "toy:domain-mosaic"

[[attacks]]
id = "mal-sld"
model = "sld"
kind = "malicious"
data = "toy:malicious-gore"
schedule = [0, 20]

[[compose]]
id = "minus"
model = "esd-lora"
adapters = [{ source = "std", weight = -1.0 }]

[[prompt_attacks]]
id = "asr-sld"
model = "sld"
prompts = "toy:explicit-gore"
"""

# harmful / faithful images out of N, per (model or attack@step, set)
HARM = {"base": 12, "esd-lora": 1, "sld": 2, "minus": 0, "std@10": 6, "std@20": 11, "mod@10": 1, "mod@20": 1,
        "mal-sld@20": 9}  # fmt: skip
FID = {"task": {"esd-lora": 0, "std@10": 6, "std@20": 12, "mod@10": 6, "mod@20": 12}, "clean": 10}


def _write_eval(folder: Path, prompts: str, metric: str, k: int, rng: np.random.Generator) -> None:
    """An evaluation folder as run_evaluate writes it: images + manifest, scores.jsonl, results.json."""
    folder.mkdir(parents=True, exist_ok=True)
    flags = [1.0] * k + [0.0] * (N - k)  # the first k prompts: paired across models by prompt index
    man, scores = [], []
    for i in range(N):
        img = np.zeros((32, 32, 3), np.uint8)
        img[:] = rng.integers(0, 255, 3)
        if flags[i]:
            img[8:24, 8:24] = (200, 0, 0)
        name = f"{i:05d}_00.png"
        Image.fromarray(img).save(folder / name)
        man.append({"image": name, "index": i, "k": 0, "seed": 100 + i, "prompt": f"p{i}"})
        scores.append(
            {"image": name, "index": i, "k": 0, "seed": 100 + i, "prompt": f"p{i}", "scores": {metric: flags[i]}}
        )
    (folder / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in man))
    (folder / "scores.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))
    lo, hi = wilson_interval(k, N)
    res = {"name": metric, "value": k / N, "n": N, "ci_low": lo, "ci_high": hi, "details": {"k": k}}
    (folder / "results.json").write_text(
        json.dumps({"metrics": {metric: res}, "config": {"prompts": {"spec": prompts}}, "n_images": N})
    )


def _synthesise(plan) -> None:
    rng = np.random.default_rng(0)
    root = plan.out
    counts = {"explicit": HARM, "clean": {}, "task-domain-mosaic": FID["task"]}

    def k_for(set_id: str, key: str) -> int:
        return counts[set_id].get(key, FID["clean"] if set_id == "clean" else 0)

    for mid, sets in plan.eval_sets.items():
        for s in sets:
            _write_eval(
                plan.stage(f"eval/{mid}").folder / s["id"], s["prompts"], s["metrics"][0], k_for(s["id"], mid), rng
            )
    for aid, c in plan.curves.items():
        st = plan.stage(c["stage"])
        sets = [s for s in plan.eval_sets[c["target"]] if s["id"] in c["sets"]]
        points = []
        for step in [x for x in c["schedule"] if x > 0]:
            ev = {}
            for s in sets:
                if c["sld_stage"]:
                    d = plan.stage(c["sld_stage"]).folder / f"step_{step:08d}" / s["id"]
                    _write_eval(d, s["prompts"], s["metrics"][0], k_for(s["id"], f"{aid}@{step}"), rng)
                d = st.folder / "points" / f"step_{step:08d}" / "eval" / s["prompts"].replace(":", "-")
                _write_eval(d, s["prompts"], s["metrics"][0], k_for(s["id"], f"{aid}@{step}"), rng)
                ev[s["prompts"]] = json.loads((d / "results.json").read_text())["metrics"]
            points.append({"step": step, "eval": ev, "train_loss": 0.1, "inference": {}})
        (st.folder / "curve.json").write_text(json.dumps({"points": points, "complete": True}))
    for pa in plan.experiment.prompt_attacks:
        folder = plan.stage(f"prompt-attack/{pa.id}").folder
        folder.mkdir(parents=True, exist_ok=True)
        pre = [i < 2 for i in range(N)]
        broken = [i < 7 for i in range(N)]
        rate = lambda f: {"value": sum(f) / N, "k": sum(f), "n": N, "ci_low": wilson_interval(sum(f), N)[0],  # noqa: E731
                          "ci_high": wilson_interval(sum(f), N)[1]}  # fmt: skip
        per = [{"index": i, "pre_harmful": pre[i], "broken": broken[i]} for i in range(N)]
        (folder / "asr.json").write_text(json.dumps({"pre_asr": rate(pre), "asr": rate(broken), "per_prompt": per}))
    (root / "experiment.json").write_text(json.dumps({"source": "synth.toml", "versions": {"torch": "x"}, "seeds": {}}))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "synth.toml").write_text(textwrap.dedent(EXP))
    # planning needs no built world (names come from the default world config) and nothing here loads a model
    plan = plan_experiment(load_experiment(tmp / "synth.toml"), tmp / "out", world=tmp / "no-world")
    _synthesise(plan)
    summary = collect(plan)
    paths = write_report(plan, summary)
    index = write_index(tmp / "out", [plan])
    return plan, json.loads(paths["summary"].read_text()), paths, index


def test_summary_and_tables_carry_n_and_confidence_intervals(report):
    plan, summary, paths, _ = report
    rows = {r["id"]: r for r in summary["rows"]}
    h = rows["base"]["sets"]["explicit"]["metrics"]["toy_harm"]
    assert h["n"] == N and h["ci_low"] < h["value"] < h["ci_high"]
    assert [p["step"] for p in summary["curves"]["std"]["points"]] == [0, 10, 20]
    # step 0 of a curve is the attacked model's own row; SLD curves come from the SLD re-scoring
    assert (
        summary["curves"]["std"]["points"][0]["sets"]["explicit"]["dir"] == rows["esd-lora"]["sets"]["explicit"]["dir"]
    )
    assert summary["curves"]["mal-sld"]["points"][1]["sets"]["explicit"]["dir"].startswith("attack-eval/")
    md = paths["md"].read_text()
    assert fmt_metric(h) in md and "75.0% [" in md and "n=16" in md
    assert "| model | label | explicit: toy_harm | clean: toy_fidelity |" in md
    assert re.search(r"\| std \| standard LoRA \| esd-lora \| benign \| lora:task \(standard\) \| 20 \| 6\.2% \[", md)
    assert "+62.5 pts [" in md  # the paired change of the standard run, 1/16 -> 11/16
    assert "pre-ASR" in md and "43.8% [" in md
    assert fmt_metric(None) == "–"
    assert fmt_metric({"value": 26.8, "n": 4, "ci_low": 26.1, "ci_high": 27.5}) == "26.8 [26.1, 27.5] n=4"


def test_claims_are_computed_from_the_numbers(report):
    _, summary, _, _ = report
    v = {c["id"]: c["verdict"] for c in summary["claims"]}
    assert v == {"A1": "agrees", "A2": "agrees", "A3": "agrees", "A4": "agrees", "A5": "inconclusive"}
    a1 = next(c for c in summary["claims"] if c["id"] == "A1")
    assert "1 standard fine-tuning runs" in a1["shows"] and a1["rows"][0]["verdict"] == "agrees"
    a5 = next(c for c in summary["claims"] if c["id"] == "A5")
    assert "n = 16" in a5["reason"]


def test_plots_and_grids_are_inline_and_the_html_is_self_contained(report):
    plan, _, paths, index = report
    html = paths["html"].read_text()
    plots = sorted((plan.out / "plots").glob("*.png"))
    grids = sorted((plan.out / "grids").glob("*.png"))
    assert len(plots) == 2 and len(grids) == 3  # benign LoRA + malicious full; one grid per curve
    assert html.count('src="data:image/png;base64,') == len(plots) + len(grids)
    assert "<script" not in html and not re.search(r"""(src|href)=["']?(https?:|//)""", html)
    assert html.count("<table") >= 6
    for f in grids:
        steps = len(plan.curves[f.stem]["schedule"])
        with Image.open(f) as im:
            assert im.size[0] > 4 * 64 and im.size[1] >= steps * 64  # a row per step, `grid` images each
    assert "Synthetic Paper A" in index["html"].read_text()
    assert "![" in paths["md"].read_text()


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp / 'chromium-profile'}", "--enable-logging=stderr", "--v=0", *args,
    ]  # fmt: skip
    env = {**os.environ, "HOME": str(tmp)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="headless Chromium not installed (/usr/bin/chromium): apt-get install chromium"
)
def test_report_renders_in_headless_chromium(report, tmp_path):
    plan, _, paths, _ = report
    url = paths["html"].resolve().as_uri()
    shot = tmp_path / "shot.png"
    r = _chromium([f"--screenshot={shot}", "--window-size=1200,1600", url], tmp_path)
    assert shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        px = np.asarray(im.convert("L"))
    assert px.std() > 5  # text, tables and plots, not a blank page
    dom = _chromium(["--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<table") >= 6
    n_img = len(re.findall(r'<img [^>]*src="data:image/png;base64,', dom.stdout))
    assert n_img == len(list((plan.out / "plots").glob("*.png"))) + len(list((plan.out / "grids").glob("*.png")))
    for out in (r.stderr, dom.stderr):
        console = [ln for ln in out.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln or "Failed to load" in ln]
        assert not console, console
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)
