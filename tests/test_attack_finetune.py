"""Relearning curves: schedule validation, curve.json contents, resume without recomputation, segments equal a
straight run, and the `attack finetune` CLI (on the micro world: plumbing, not numbers)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import conceptlock.attacks.finetune as AF
import conceptlock.commands.evaluate as EV
from conceptlock.attacks.finetune import default_evals, parse_eval_spec, parse_schedule, run_attack_curve
from conceptlock.errors import ConceptlockError
from conceptlock.finetune import run_finetune


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPUs are shared: one intra-op thread is several times faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def world(micro_world, monkeypatch):
    import conceptlock.world as W

    monkeypatch.setattr(W, "_CURRENT", micro_world)
    return micro_world


FAST = dict(limit=2, gen_steps=2, batch_size=2, progress=False)


def test_schedule_parsing_and_bad_schedules_are_one_line_errors(tmp_path):
    assert parse_schedule("0, 20,100,200") == [0, 20, 100, 200]
    assert parse_schedule([5]) == [5]
    for bad, why in [
        ("0,20,20", "strictly increasing"),
        ([20, 0], "strictly increasing"),
        ("-1,5", ">= 0"),
        ("0,a", "whole number"),
        ([0, 1.5], "whole number"),
        ("", "whole number|at least one"),
        ([], "at least one"),
    ]:
        with pytest.raises(ConceptlockError, match=why) as e:
            parse_schedule(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ConceptlockError, match="strictly increasing"):
        run_attack_curve("/nonexistent", "toy:x", tmp_path / "c", schedule="0,100,20")
    assert not (tmp_path / "c").exists()  # nothing written before the schedule is checked


def test_eval_specs_and_defaults():
    assert parse_eval_spec("toy:clean=toy_fidelity,toy_harm") == ("toy:clean", ["toy_fidelity", "toy_harm"])
    assert parse_eval_spec("p.csv=nudenet:preset=i2p-6@0.5") == ("p.csv", ["nudenet:preset=i2p-6@0.5"])
    with pytest.raises(ConceptlockError, match="PROMPTS=METRIC"):
        parse_eval_spec("toy:clean")
    assert default_evals("toy:malicious-fire") == {"toy:explicit-fire": ["toy_harm"], "toy:clean": ["toy_fidelity"]}
    assert list(default_evals("toy:domain-mosaic")) == ["toy:explicit-gore", "toy:clean"]


def test_curve_resumes_without_recomputing_finished_points(world, tmp_path, monkeypatch):
    model, out = world / "pipeline", tmp_path / "curve"
    calls = {"eval": [], "train": 0}
    real_eval, real_train = EV.run_evaluate, AF.train

    def counting_eval(out_dir, *a, **kw):
        calls["eval"].append(out_dir.parts[-3])
        if crash and "step_00000002" in str(out_dir):
            raise KeyboardInterrupt  # killed while scoring the last point
        return real_eval(out_dir, *a, **kw)

    def counting_train(*a, **kw):
        calls["train"] += 1
        return real_train(*a, **kw)

    monkeypatch.setattr(EV, "run_evaluate", counting_eval)
    monkeypatch.setattr(AF, "train", counting_train)
    kw = dict(schedule=[0, 1, 2], params="lora:attack", lr=1e-3, **FAST)
    crash = True
    with pytest.raises(KeyboardInterrupt):
        run_attack_curve(model, "toy:malicious-gore", out, **kw)
    assert calls["train"] == 2 and (out / "points" / "step_00000002" / "attack.safetensors").is_file()
    partial = json.loads((out / "curve.json").read_text())
    assert [p["step"] for p in partial["points"]] == [0, 1] and not partial["complete"]

    crash, calls["eval"], calls["train"] = False, [], 0
    res = run_attack_curve(model, "toy:malicious-gore", out, **kw)
    assert calls["train"] == 0  # the step-2 adapter was saved before the crash: only its scoring is redone
    assert calls["eval"] == ["step_00000002", "step_00000002"]  # two prompt sets, last point only
    curve = json.loads((out / "curve.json").read_text())
    assert curve["complete"] and [p["step"] for p in curve["points"]] == [0, 1, 2]
    for p in curve["points"]:
        assert p["n"] == 2 and 0 <= p["ci_low"] <= p["harmful_rate"] <= p["ci_high"] <= 1
        assert p["fidelity_n"] == 2 and 0 <= p["fidelity"] <= 1
        assert set(p["eval"]) == {"toy:explicit-gore", "toy:clean"}
    assert curve["points"][0]["artifact"] is None and curve["points"][2]["train_loss"] is not None
    assert curve["points"][2]["inference"]["adapters"] == [
        f"attack={out / 'points' / 'step_00000002' / 'attack.safetensors'}:1"
    ]
    assert [p["step"] for p in res.points] == [0, 1, 2]

    calls["eval"], calls["train"] = [], 0
    run_attack_curve(model, "toy:malicious-gore", out, **kw)
    assert calls == {"eval": [], "train": 0}  # a finished curve is not recomputed at all

    # cutting the run at the schedule's points does not change it: step 2 equals a straight 2-step run
    straight = run_finetune(
        model, "toy:malicious-gore", tmp_path / "straight", params="lora:attack", steps=2, lr=1e-3, batch_size=2
    )
    a, b = load_file(str(straight.artifact)), load_file(str(out / "points" / "step_00000002" / "attack.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a lost artefact whose checkpoint survives is rebuilt from the checkpoint, not retrained
    (out / "points" / "step_00000002" / "attack.safetensors").unlink()
    curve["points"] = curve["points"][:2]
    (out / "curve.json").write_text(json.dumps(curve))
    calls["eval"], calls["train"] = [], 0
    run_attack_curve(model, "toy:malicious-gore", out, **kw)
    assert calls["train"] == 0 and calls["eval"] == ["step_00000002", "step_00000002"]
    c = load_file(str(out / "points" / "step_00000002" / "attack.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)

    with pytest.raises(ConceptlockError, match="different configuration \\(train") as e:
        run_attack_curve(model, "toy:malicious-gore", out, **{**kw, "lr": 1e-2})
    assert "\n" not in str(e.value)


def test_attack_cli_full_finetune_curve(world, tmp_path):
    from conceptlock.cli import app

    runner = CliRunner()
    helped = runner.invoke(app, ["attack", "--help"])
    assert helped.exit_code == 0 and "finetune" in helped.output
    helped = runner.invoke(app, ["attack", "finetune", "--help"])
    assert helped.exit_code == 0 and "Example" in helped.output and "--schedule" in helped.output
    out = tmp_path / "full"
    args = ["attack", "finetune", "--model", str(world / "pipeline"), "--data", "toy:malicious-gore", "--out", str(out)]
    args += ["--schedule", "0,1", "--limit", "2", "--gen-steps", "2", "--batch-size", "2"]
    res = runner.invoke(app, [*args, "--eval", "toy:implicit-gore=toy_harm,toy_fidelity"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and (out / "points" / "step_00000001" / "model" / "model_index.json").is_file()
    curve = json.loads((out / "curve.json").read_text())
    assert curve["config"]["params"] == "full" and curve["config"]["mode"] == "standard"
    assert curve["points"][1]["inference"] == {
        "model": str(out / "points" / "step_00000001" / "model"),
        "adapters": [],
        "carried": [],
    }
    assert curve["points"][1]["fidelity_n"] == 2 and curve["points"][1]["n"] == 2
