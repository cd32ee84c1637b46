"""Experiments as data: TOML validation with one-line errors naming the TOML path, offline dry runs of every bundled
experiment (the GPU recipes included), the plan's stages, and resume after a kill giving the same numbers."""

from __future__ import annotations

import json
import re
import shutil
import textwrap

import pytest
import torch
from typer.testing import CliRunner

import conceptlock.align  # noqa: F401  (these bind load_pipeline at import: import them before any test patches it)
import conceptlock.attacks.finetune  # noqa: F401
import conceptlock.attacks.prompt  # noqa: F401
import conceptlock.experiments.runner as R
import conceptlock.finetune  # noqa: F401
import conceptlock.methods.uce  # noqa: F401
from conceptlock.cli import app  # imports every command module
from conceptlock.errors import ConceptlockError
from conceptlock.experiments.config import bundled_experiments, load_experiment
from conceptlock.experiments.runner import plan_experiment, run_experiment, run_plan


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPUs are shared: one intra-op thread is several times faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# A tiny experiment touching every stage kind: LoRA and full alignment, an SLD baseline, modular and standard LoRA
# curves with a task set, a malicious curve on the SLD row (shared with nothing, re-scored with SLD), a class-filtered
# clean curve, model arithmetic on a curve's LoRA, and an adversarial-prompt attack.
TINY = """
name = "tiny"
title = "tiny"
paper = "A"

[model]
world = "toy"
concept = "gore"

[eval]
limit = 2
gen_steps = 2
batch_size = 2
grid = 2

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
steps = 1
objective = { ddim_steps = 2 }

[[align]]
id = "lt"
method = "lcfd-lt"
steps = 1
batch_size = 2
grad_accum = 1

[[baselines]]
id = "sld"
model = "base"
sld = "MAX"

[[attacks]]
id = "mod"
model = "esd-lora"
kind = "benign"
data = "toy:domain-mosaic"
params = "lora:task"
mode = "modular"
schedule = [0, 1, 2]
batch_size = 2
task = "toy:domain-mosaic"

[[attacks]]
id = "std"
model = "esd-lora"
kind = "benign"
data = "toy:domain-mosaic"
params = "lora:task"
mode = "standard"
schedule = [0, 2]
batch_size = 2

[[attacks]]
id = "mal-sld"
model = "sld"
kind = "malicious"
data = "toy:malicious-gore"
schedule = [0, 1]
batch_size = 2

[[attacks]]
id = "clean-lt"
model = "lt"
kind = "clean"
data = "toy:lcfd-gore"
data_class = 1
schedule = [0, 1]
batch_size = 2

[[compose]]
id = "minus"
model = "esd-lora"
adapters = [{ source = "std", weight = -1.0 }]

[[prompt_attacks]]
id = "asr-sld"
model = "sld"
prompts = "toy:explicit-gore"
limit = 2
iterations = 1
k = 2
gen_steps = 2

[profiles.quick]
exclude = ["lt"]
attacks."*" = { schedule = [0, 1] }
"""


def _tiny(tmp_path, text: str = TINY, name: str = "tiny.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def _err(tmp_path, text: str, profile: str = "full") -> str:
    p = _tiny(tmp_path, text)
    with pytest.raises(ConceptlockError) as e:
        load_experiment(p, profile)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            ("schedule = [0, 1, 2]", "schedule = [0, 20, 20]"),
            "tiny.toml: attacks[0].schedule: must be strictly increasing (20 then 20)",
        ),
        (
            ("steps = 1\nobjective", "stepz = 1\nobjective"),
            "tiny.toml: align[0].stepz: unknown key (known: id, label, method",
        ),
        (
            ('model = "sld"\nkind = "malicious"', 'model = "nope"\nkind = "malicious"'),
            "tiny.toml: attacks[2].model: unknown model 'nope'",
        ),
        (
            ('kind = "clean"', 'kind = "evil"'),
            "tiny.toml: attacks[3].kind: Input should be 'benign', 'malicious' or 'clean'",
        ),
        (
            ("steps = 1\nbatch_size = 2", 'steps = "ten"\nbatch_size = 2'),
            "tiny.toml: align[1].steps: Input should be a valid integer",
        ),
        (('method = "lcfd-lt"', 'method = "uce"'), "tiny.toml: align[1].steps: method uce is training-free"),
        (
            ('method = "esd"\nparams = "lora:safety"\nsteps = 1', 'method = "uce"\nparams = "lora:safety"\nrank = 8'),
            "tiny.toml: align[0].rank: method uce writes its LoRA at the rank that holds the edit",
        ),
        (('sld = "MAX"', 'sld = "HUGE"'), "tiny.toml: baselines[0].sld: unknown SLD preset 'HUGE'"),
        (('source = "std"', 'source = "lt"'), "tiny.toml: compose[0].adapters[0].source: 'lt' is not a LoRA run"),
        (('mode = "standard"', 'mode = "modular"\nparams2 = 1'), "tiny.toml: attacks[1].params2: unknown key"),
        (('id = "std"', 'id = "mod"'), "tiny.toml: attacks[1].id: duplicate id 'mod'"),
        (('params = "lora:safety"', 'params = "lora"'), "tiny.toml: align[0].params: 'lora': use one of full"),
        (("limit = 2", "limit = 0"), "tiny.toml: eval.limit: Input should be greater than 0"),
        (('concept = "gore"', 'concept = "nudity"'), "tiny.toml: model.concept: 'nudity' is not a toy-world concept"),
        (('name = "tiny"', 'name = "tiny"\n[oops'), "tiny.toml: not valid TOML"),
    ],
)
def test_config_errors_are_one_line_and_name_the_toml_path(tmp_path, edit, expected):
    old, new = edit
    assert old in TINY
    msg = _err(tmp_path, TINY.replace(old, new, 1))
    assert msg.startswith(expected), msg


def test_a_training_free_edit_may_be_written_as_a_safety_lora(tmp_path):
    """UCE takes params = "lora:NAME" (the edit as a safety LoRA, usable as a Modular LoRA base) but no trainer field."""
    old = 'method = "esd"\nparams = "lora:safety"\nsteps = 1\nobjective = { ddim_steps = 2 }'
    assert old in TINY
    exp = load_experiment(_tiny(tmp_path, TINY.replace(old, 'method = "uce"\nparams = "lora:safety"', 1)), "full")
    assert exp.align[0].method == "uce" and exp.align[0].is_lora and exp.align[0].adapter == "safety"
    msg = _err(tmp_path, TINY.replace(old, 'method = "uce"\nparams = "xattn"', 1))
    assert msg.startswith("tiny.toml: align[0].params: method uce is training-free"), msg


def test_profile_overrides_apply_and_their_errors_name_the_profile(tmp_path):
    full, quick = load_experiment(_tiny(tmp_path), "full"), load_experiment(_tiny(tmp_path), "quick")
    assert [a.schedule for a in full.attacks] == [[0, 1, 2], [0, 2], [0, 1], [0, 1]]
    assert [a.schedule for a in quick.attacks] == [[0, 1]] * 3  # "*" override; clean-lt left out with lt
    assert quick.excluded == {"lt": "profiles.quick.exclude", "clean-lt": "needs 'lt'"}
    bad = TINY.replace('attacks."*" = { schedule = [0, 1] }', 'attacks."*" = { schedule = [3, 1] }')
    assert _err(tmp_path, bad, "quick").startswith("tiny.toml: profiles.quick.attacks.*.schedule: must be strictly")
    bad = TINY.replace('exclude = ["lt"]', 'exclude = ["lt"]\nalign.nope = { steps = 2 }')
    assert _err(tmp_path, bad, "quick").startswith("tiny.toml: profiles.quick.align.nope: unknown align id")
    bad = TINY.replace('exclude = ["lt"]', 'exclude = ["lx"]')
    assert "profiles.quick.exclude[0]: unknown entry id 'lx'" in _err(tmp_path, bad, "quick")
    bad = TINY.replace('exclude = ["lt"]', 'exclud = ["lt"]')
    assert "profiles.quick.exclud: unknown key" in _err(tmp_path, bad, "quick")
    with pytest.raises(ConceptlockError, match="--profile 'huge'"):
        load_experiment(_tiny(tmp_path), "huge")


def test_plan_checks_names_against_the_world_before_loading_anything(tmp_path, micro_world):
    exp = load_experiment(_tiny(tmp_path, TINY.replace("toy:clean", "toy:cleann")))
    with pytest.raises(
        ConceptlockError, match=r"tiny.toml: eval.sets\[1\].prompts: unknown toy prompt set 'toy:cleann'"
    ):
        plan_experiment(exp, tmp_path / "o", world=micro_world)
    exp = load_experiment(_tiny(tmp_path, TINY.replace('["toy_fidelity"]', '["toy_fidelty"]')))
    with pytest.raises(ConceptlockError, match=r"eval.sets\[1\].metrics: unknown metric 'toy_fidelty'"):
        plan_experiment(exp, tmp_path / "o", world=micro_world)
    exp = load_experiment(_tiny(tmp_path, TINY.replace("toy:malicious-gore", "toy:malicious-gorre")))
    with pytest.raises(ConceptlockError, match=r"attacks\[2\].data: unknown toy data set 'toy:malicious-gorre'"):
        plan_experiment(exp, tmp_path / "o", world=micro_world)


def test_every_bundled_experiment_dry_runs_offline_without_loading_weights(tmp_path, monkeypatch):
    """Both profiles of every bundled file, the GPU recipes included: plan only, no weights, no network."""
    import conceptlock.pipelines as P
    import conceptlock.world.build as B

    def forbidden(*a, **k):
        raise AssertionError("a dry run must not load or build anything")

    monkeypatch.setattr(P, "load_pipeline", forbidden)
    monkeypatch.setattr(B, "build_world", forbidden)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = bundled_experiments()
    assert {"paper-a", "paper-b", "paper-b-sd14", "paper-a-sd15", "paper-b-sdxl"} <= set(names)
    for profile in ("quick", "full", "complete"):
        plans = run_experiment(
            names, profile, tmp_path / "out", world=tmp_path / "no-world", dry_run=True, progress=False
        )
        assert not (tmp_path / "out").exists()  # nothing written
        by = {p.experiment.name: p for p in plans}
        # the complete profile runs on the full profile's world (worlds come in quick and full only)
        assert by["paper-b"].stage("world").spec["profile"] == {"quick": "quick"}.get(profile, "full")
        sd14 = by["paper-b-sd14"]
        assert sd14.experiment.model.base == "CompVis/stable-diffusion-v1-4"
        assert sd14.world is None and "world" not in [s.id for s in sd14.stages]
        sets = {s["id"]: s for s in sd14.eval_sets["base"]}
        assert {"nudenet:preset=resalign-9@0.45", "q16"} <= set(sets["i2p"]["metrics"])
        assert {"clip_score", "aesthetic"} <= set(sets["coco"]["metrics"])
        assert any("pass --input i2p=PATH" in w for w in sd14.warnings)  # prompts passed by path, checked at run time
        a, b = by["paper-a"], by["paper-b"]
        kinds_b = {s.kind for s in b.stages}
        assert {"world", "align", "eval", "attack", "attack-eval", "prompt-attack", "data", "report"} <= kinds_b
        assert {"compose", "attack"} <= {s.kind for s in a.stages}
    quick_b = load_experiment("paper-b", "quick")
    assert all(s <= 20 for at in quick_b.attacks for s in at.schedule) and quick_b.eval.limit <= 16
    # the same through the CLI
    res = CliRunner().invoke(
        app, ["reproduce", "paper-b-sd14", "paper-a-sd15", "--dry-run", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 0, res.output
    assert "dry run OK: 2 experiment(s)" in res.output


def test_cli_help_has_an_example_and_bad_names_fail_in_one_line(tmp_path):
    res = CliRunner().invoke(app, ["reproduce", "--help"])
    assert res.exit_code == 0 and "conceptlock reproduce paper-a paper-b --profile quick" in res.output
    res = CliRunner().invoke(app, ["reproduce", "paper-z", "--dry-run"])
    assert isinstance(res.exception, ConceptlockError)
    assert "unknown experiment 'paper-z'" in str(res.exception) and "\n" not in str(res.exception)
    res = CliRunner().invoke(app, ["reproduce", "paper-a", "--dry-run", "--input", "oops"])
    assert "expected NAME=PATH" in str(res.exception)


def test_plan_stages_dependencies_and_step0_reuse(tmp_path, micro_world):
    plan = plan_experiment(load_experiment(_tiny(tmp_path)), tmp_path / "o", world=micro_world)
    ids = [s.id for s in plan.stages]
    assert ids[0] == "world" and ids[-1] == "report"
    assert set(ids) == {
        "world", "align/esd-lora", "align/lt", "attack/mod", "attack/std", "attack/mal-sld", "attack-eval/mal-sld",
        "data/lcfd-gore-class1", "attack/clean-lt", "compose/minus", "eval/base", "eval/esd-lora", "eval/lt",
        "eval/sld", "eval/minus", "prompt-attack/asr-sld", "report",
    }  # fmt: skip
    for s in plan.stages:  # topological order
        assert all(ids.index(d) < ids.index(s.id) for d in s.deps), s.id
    deps = {s.id: set(s.deps) for s in plan.stages}
    assert deps["compose/minus"] == {"align/esd-lora", "attack/std"}
    assert deps["attack/clean-lt"] == {"align/lt", "data/lcfd-gore-class1"}
    assert deps["attack-eval/mal-sld"] == {"attack/mal-sld"}
    # curves skip step 0 (the model row is step 0) and the SLD row's curve is re-scored with SLD
    assert plan.stage("attack/mod").spec["schedule"] == [1, 2]
    assert plan.stage("attack/mal-sld").spec["model"]["options"] == {}
    assert plan.stage("attack-eval/mal-sld").spec["options"]["sld"] == "MAX"
    # the modular curve's task set is scored on its target's row too (step 0)
    assert [s["id"] for s in plan.eval_sets["esd-lora"]] == ["explicit", "clean", "task-domain-mosaic"]
    # the modular LoRA trains with the safety adapter carried (and inactive)
    assert plan.stage("attack/mod").spec["model"]["adapters"][0].startswith("safety=")
    # an edit changes the key of that entry and of everything downstream only
    plan2 = plan_experiment(
        load_experiment(_tiny(tmp_path, TINY.replace("steps = 1\nobjective", "steps = 2\nobjective"))),
        tmp_path / "o",
        world=micro_world,
    )
    changed = {s.id for s in plan.stages if s.key != plan2.stage(s.id).key}
    assert changed == {
        "align/esd-lora",
        "attack/mod",
        "attack/std",
        "compose/minus",
        "eval/esd-lora",
        "eval/minus",
        "report",
    }


def _numbers(out) -> dict:
    """Every number of a run (summary.json minus nothing: it holds no times or absolute paths)."""
    summary = json.loads((out / "tiny" / "summary.json").read_text())
    scores = {
        str(p.relative_to(out)): p.read_text() for p in sorted((out / "tiny").rglob("scores.jsonl"))
    }  # per-image scores of every evaluation
    return {"summary": summary, "scores": scores}


def test_resume_after_a_kill_gives_the_same_results(tmp_path, micro_world, monkeypatch):
    exp = load_experiment(_tiny(tmp_path))

    def run(out):
        plan = plan_experiment(exp, out, world=micro_world)
        return plan, run_plan(plan, progress=False)

    # uninterrupted
    plan1, status1 = run(tmp_path / "a")
    assert set(status1.values()) == {"ran"}
    rec = json.loads((tmp_path / "a" / "tiny" / "experiment.json").read_text())
    assert rec["status"] == "done" and rec["versions"]["torch"] and rec["seeds"]["stages"]["attack/mod"] == 0
    st = json.loads((plan1.stage("attack/mod").folder / "stage.json").read_text())
    assert st["status"] == "done" and st["wall_s"] >= 0 and st["spec"]["seed"] == 0
    assert (tmp_path / "a" / "tiny" / "report.html").is_file()

    # killed twice: once between stages (the second curve), once inside a curve's evaluation of a point
    real_attack, real_eval = R.STAGE_RUNNERS["attack"], None
    calls = {"attack": 0}

    def dying_attack(ctx, stage):
        calls["attack"] += 1
        if calls["attack"] == 2:
            raise KeyboardInterrupt
        return real_attack(ctx, stage)

    monkeypatch.setitem(R.STAGE_RUNNERS, "attack", dying_attack)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "tiny" / "experiment.json").read_text())["status"] == "interrupted"
    monkeypatch.setitem(R.STAGE_RUNNERS, "attack", real_attack)

    import conceptlock.commands.evaluate as EV

    real_eval, n_eval = EV.run_evaluate, {"n": 0}

    def dying_eval(*a, **k):
        n_eval["n"] += 1
        if "points" in str(a[0]) and "step_00000002" in str(a[0]):
            raise KeyboardInterrupt  # inside attack/mod, after its first point
        return real_eval(*a, **k)

    monkeypatch.setattr(EV, "run_evaluate", dying_eval)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(EV, "run_evaluate", real_eval)
    _, status = run(tmp_path / "b")
    assert status["align/esd-lora"] == "skipped" and status["attack/std"] == "skipped"
    assert status["attack/mod"] == "ran"
    assert _numbers(tmp_path / "a") == _numbers(tmp_path / "b")
    # and a finished run restarted does nothing but the report
    _, status = run(tmp_path / "b")
    assert {k for k, v in status.items() if v == "ran"} == {"report"}
    assert _numbers(tmp_path / "a") == _numbers(tmp_path / "b")


def test_parallel_stages_give_the_sequential_numbers_and_resume(tmp_path, micro_world, monkeypatch):
    """--jobs 2 runs stages in two one-thread worker processes; with one thread here too, the numbers must match."""
    exp = load_experiment(_tiny(tmp_path))
    seq = plan_experiment(exp, tmp_path / "a", world=micro_world)
    run_plan(seq, progress=False)
    par = plan_experiment(exp, tmp_path / "p", world=micro_world)
    [status] = R.run_plans([par], jobs=2, progress=False)
    assert set(status.values()) == {"ran"} and set(status) == {s.id for s in par.stages}
    assert _numbers(tmp_path / "a") == _numbers(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "tiny" / "experiment.json").read_text())["status"] == "done"
    # every stage waited for what it needs: no stage started before one of its dependencies finished
    rec = {s.id: json.loads((s.folder / "stage.json").read_text()) for s in par.stages}
    for s in par.stages:
        for d in s.deps:
            assert rec[d]["finished"] <= rec[s.id]["started"], (d, s.id)
    # a stage that fails stops the run with its error, keeps what finished, and a rerun does only the rest
    shutil.rmtree(par.stage("attack/mod").folder)
    shutil.rmtree(par.stage("eval/esd-lora").folder)
    broken = tmp_path / "broken"  # passes planning (a folder), fails in its stage (a row names a missing image)
    broken.mkdir()
    (broken / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "a picture"}\n')
    bad = tmp_path / "tiny-bad.toml"
    bad.write_text(TINY.replace('data = "toy:malicious-gore"', f'data = "{broken}"', 1))
    with pytest.raises(ConceptlockError):
        R.run_plans([plan_experiment(load_experiment(bad), tmp_path / "q", world=micro_world)], jobs=2, progress=False)
    assert json.loads((tmp_path / "q" / "tiny" / "experiment.json").read_text())["status"] == "interrupted"
    [status] = R.run_plans([plan_experiment(exp, tmp_path / "p", world=micro_world)], jobs=2, progress=False)
    assert {k for k, v in status.items() if v == "ran"} == {"attack/mod", "eval/esd-lora", "report"}
    assert _numbers(tmp_path / "a") == _numbers(tmp_path / "p")
    with pytest.raises(ConceptlockError, match="--jobs 0"):
        R.run_plans([par], jobs=0)


def test_a_changed_entry_reruns_only_what_depends_on_it(tmp_path, micro_world):
    text = (
        TINY.split("[[attacks]]")[0]
        + '[[compose]]\nid = "minus"\nmodel = "base"\nadapters = [{ source = "esd-lora", weight = -1.0 }]\n'
    )
    text = re.sub(r"\[\[align\]\]\nid = \"lt\".*?grad_accum = 1\n", "", text, flags=re.S)
    plan = plan_experiment(load_experiment(_tiny(tmp_path, text)), tmp_path / "o", world=micro_world)
    run_plan(plan, progress=False)
    text2 = text.replace("limit = 2\n", "limit = 2\nseed = 1\n", 1)  # the eval seed: every eval, no training
    plan2 = plan_experiment(load_experiment(_tiny(tmp_path, text2)), tmp_path / "o", world=micro_world)
    status = run_plan(plan2, progress=False)
    assert status["align/esd-lora"] == "skipped" and status["compose/minus"] == "skipped"
    assert status["eval/base"] == "ran" and status["eval/minus"] == "ran"
    seeds = json.loads((plan2.stage("eval/base").folder / "explicit" / "results.json").read_text())["config"]
    assert seeds["prompts"]["base_seed"] == 1
    # a result deleted by hand is recomputed even though its stage.json says done
    (plan2.stage("eval/minus").folder / "clean" / "results.json").unlink()
    status = run_plan(plan2, progress=False)
    assert status["eval/minus"] == "ran" and status["eval/base"] == "skipped"
