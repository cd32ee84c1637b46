"""`run_align` / `conceptlock align` end to end on a tiny pipeline: artefacts, config, errors, CLI help."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conceptlock.adapters import load_adapter
from conceptlock.align import anchor_pairs, resolve_concept, run_align
from conceptlock.pipelines import ConceptlockError, load_pipeline, save_pipeline, tiny_pipeline


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPUs are shared: one intra-op thread is several times faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def lcfd_folder(tmp_path):
    folder = tmp_path / "lcfd"
    folder.mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}", "class": 1 + i % 2}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_lcfd_full_writes_loadable_pipeline_and_config(tmp_path, lcfd_folder):
    base = tiny_pipeline(0)
    res = run_align(
        "lcfd-lt",
        base,
        ["gore"],
        tmp_path / "run",
        steps=2,
        batch_size=2,
        grad_accum=1,
        data=lcfd_folder,
        released_code=True,
    )
    assert res.finished and res.artifact == tmp_path / "run" / "model"
    aligned = load_pipeline(res.artifact)
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(aligned.unet.parameters(), tiny_pipeline(0).unet.parameters(), strict=True)
    )
    assert changed
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["method"] == "lcfd-lt" and cfg["params"] == "full" and cfg["objective_config"]["released_code"] is True
    assert cfg["train"]["steps"] == 2 and cfg["train"]["lr_scheduler"] == "cosine"
    assert len((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ConceptlockError, match="already holds"):
        run_align("lcfd-lt", base, ["gore"], tmp_path / "run", steps=1, data=lcfd_folder)


def test_esd_lora_from_folder_writes_vanilla_adapter(tmp_path):
    save_pipeline(tiny_pipeline(0), tmp_path / "base")
    res = run_align(
        "esd",
        tmp_path / "base",
        ["fire", "flames"],
        tmp_path / "esd",
        params="lora:safety",
        steps=2,
        objective_kwargs={"ddim_steps": 3, "eta": 2.0},
    )
    assert res.artifact == tmp_path / "esd" / "safety.safetensors" and res.artifact.is_file()
    assert res.config["lora"] == {"rank": 4, "alpha": 4, "targets": ["to_q", "to_k", "to_v", "to_out.0"]}
    assert res.config["train"]["lr"] == 1e-4 and res.config["objective_config"]["eta"] == 2.0
    pipe = tiny_pipeline(0)
    load_adapter(pipe, res.artifact, "safety")


def test_safety_lora_targets_restrict_the_adapter_to_those_modules(tmp_path):
    """A cross-attention-only safety LoRA (ESD-x style): every adapter tensor sits in attn2, and the file loads."""
    from safetensors.torch import load_file

    save_pipeline(tiny_pipeline(0), tmp_path / "base")
    targets = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
    res = run_align(
        "esd",
        tmp_path / "base",
        ["fire"],
        tmp_path / "esd",
        params="lora:safety",
        steps=1,
        targets=targets,
        objective_kwargs={"ddim_steps": 2},
    )
    assert res.config["lora"]["targets"] == targets
    keys = list(load_file(res.artifact))
    assert keys and all(".attn2." in k for k in keys)
    assert {k.split(".attn2.")[1].split(".lora")[0] for k in keys} == {"to_q", "to_k", "to_v", "to_out.0"}
    load_adapter(tiny_pipeline(0), res.artifact, "safety")
    with pytest.raises(ConceptlockError, match="match"):
        run_align(
            "esd", tmp_path / "base", ["fire"], tmp_path / "esd2", params="lora:safety", steps=1, targets=["attn9.to_q"]
        )


def test_align_errors_are_one_line(tmp_path):
    base = tiny_pipeline(0)
    for kwargs, match in [
        (dict(method="esdx"), "--method"),
        (dict(method="lcfd-ng"), "needs --data"),
        (dict(method="sdd", released_code=True), "released-code"),
        (dict(method="esd", params="attn"), "--params"),
    ]:
        method = kwargs.pop("method")
        with pytest.raises(ConceptlockError, match=match) as e:
            run_align(method, base, ["x"], tmp_path / method, steps=1, **kwargs)
        assert "\n" not in str(e.value)


def test_resolve_concept_in_and_out_of_a_toy_world(micro_world, tmp_path):
    assert resolve_concept("nudity").prompts == ["nudity"]
    with pytest.raises(ConceptlockError, match="not a built world"):
        resolve_concept("gore", tmp_path)
    with pytest.raises(ConceptlockError, match="not a harmful concept of world") as e:
        resolve_concept("nudity", micro_world)
    assert "\n" not in str(e.value)
    r = resolve_concept("gore", micro_world)
    assert "covered in blood" in r.prompts and r.data == micro_world / "data" / "lcfd-gore"

    from conceptlock.world.concepts import HARMFUL
    from conceptlock.world.data import harmful_words

    words = harmful_words(micro_world_config(micro_world))
    evaluation = {row["prompt"] for row in csv.DictReader((micro_world / "prompts" / "explicit-gore.csv").open())}
    pairs = anchor_pairs(["gore"], micro_world, None)
    assert len(pairs) == 256 and len({p for p, _ in pairs}) > 0.9 * len(pairs)
    for prompt, anchor in pairs:  # the prompt is the anchor plus one explicit gore phrase; the anchor is clean
        rest = prompt.replace(anchor, "", 1)
        assert anchor in prompt and any(ph in rest for ph in HARMFUL["gore"].explicit), prompt
        assert not any(w in anchor for w in words), anchor
    assert not evaluation & {p for p, _ in pairs}  # not the evaluation prompts


def micro_world_config(world):
    from conceptlock.world.build import read_world
    from conceptlock.world.data import WorldConfig

    return WorldConfig(**read_world(world)["config"])


def test_anchored_esd_trains_on_prompt_anchor_pairs_from_a_csv(tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text('prompt,anchor\n"a castle, on fire",a castle\n"a dog, on fire",a dog\n')
    res = run_align(
        "esd",
        tiny_pipeline(0),
        ["fire"],
        tmp_path / "run",
        params="lora:safety",
        steps=2,
        data=pairs,
        objective_kwargs={"anchor": True, "ddim_steps": 2},
    )
    assert res.finished and res.config["prompts"] == ["a castle, on fire", "a dog, on fire"]
    assert res.config["objective_config"]["anchor"] is True
    for bad, match in [
        (None, "--anchor: give --data"),
        (tmp_path / "missing.csv", "needs a CSV file"),
        (tmp_path / "cols.csv", "missing column"),
    ]:
        (tmp_path / "cols.csv").write_text("prompt,guide\na,b\n")
        with pytest.raises(ConceptlockError, match=match) as e:
            run_align(
                "esd",
                tiny_pipeline(0),
                ["fire"],
                tmp_path / f"bad-{match[:5]}",
                params="lora:safety",
                steps=1,
                data=bad,
                objective_kwargs={"anchor": True},
            )
        assert "\n" not in str(e.value)


def test_align_finds_the_world_of_a_model_folder(micro_world, tmp_path):
    with pytest.raises(ConceptlockError, match="not a harmful concept"):
        run_align("esd", micro_world / "pipeline", ["nudity"], tmp_path / "run", steps=1)
    res = run_align(
        "lcfd-lt", micro_world / "pipeline", ["gore"], tmp_path / "lcfd", steps=1, batch_size=2, grad_accum=1
    )
    assert res.finished and res.config["data"] == str(micro_world / "data" / "lcfd-gore")


def test_cli_help_has_example():
    from conceptlock.cli import app

    res = CliRunner().invoke(app, ["align", "--help"], terminal_width=200)
    assert res.exit_code == 0
    assert "Example" in res.output and "--method" in res.output and "lora:NAME" in res.output


def test_cli_lcfd_variant_options_reach_the_objective(tmp_path, lcfd_folder):
    from conceptlock.cli import app

    model = tmp_path / "base"
    save_pipeline(tiny_pipeline(0), model)
    common = ["align", "--model", str(model), "--concept", "gore", "--data", str(lcfd_folder), "--steps", "2"]
    common += ["--batch-size", "2", "--grad-accum", "1"]
    res = CliRunner().invoke(
        app, [*common, "--method", "lcfd-lt", "--ascent-ceiling", "0.5", "--out", str(tmp_path / "x")]
    )
    assert isinstance(res.exception, ConceptlockError)
    assert "--ascent-ceiling only applies to --method lcfd-high" in str(res.exception)
    assert not (tmp_path / "x").exists()
    out = tmp_path / "high"
    args = [*common, "--method", "lcfd-high", "--ascent", "0.25", "--ascent-ceiling", "0.5", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    okw = json.loads((out / "config.json").read_text())["objective_config"]
    assert okw["ceiling"] == 0.5 and okw["ascent"] == 0.25
