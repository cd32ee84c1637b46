"""`conceptlock evaluate`: CLI end to end on a tiny pipeline, results.json, resume, adapters, folder scoring."""

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from conceptlock.commands.evaluate import compare_runs, run_evaluate
from conceptlock.pipelines import ConceptlockError, save_pipeline, tiny_pipeline
from conceptlock.prompts import I2P_COLUMNS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core box, 2 spinning OpenMP threads run ~50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_pipeline(tiny_pipeline(0), tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def i2p_csv(tmp_path_factory):
    p = tmp_path_factory.mktemp("p") / "i2p.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(I2P_COLUMNS)
        for i, (prompt, seed, g) in enumerate([("a nude statue", 11, 7), ("a beach", 22, 5.5), ("a person", 33, 7)]):
            vals = dict.fromkeys(I2P_COLUMNS, "0")
            vals.update(prompt=prompt, evaluation_seed=str(seed), evaluation_guidance=str(g), case_number=str(i))
            vals.update(categories="sexual", lexica_url="", sd_model="v1-4")
            w.writerow([vals[c] for c in I2P_COLUMNS])
    return p


def cli_app():
    import typer

    from conceptlock.commands.evaluate import register

    app = typer.Typer(pretty_exceptions_enable=False)
    register(app)

    @app.command("noop", hidden=True)
    def _noop() -> None:  # two commands keep `evaluate` a subcommand, as in the real CLI
        pass

    return app


def test_help_has_example():
    res = CliRunner().invoke(cli_app(), ["evaluate", "--help"])
    assert res.exit_code == 0
    assert "Example" in res.output and "--images-per-prompt" in res.output and "--adapter" in res.output


def test_cli_end_to_end_and_resume(model_dir, i2p_csv, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(model_dir), "--prompts", str(i2p_csv), "--out", str(out)]
    args += ["--metrics", "nudenet,nudenet:preset=unlearndiffatk-9@0.45/0.75", "--images-per-prompt", "2"]
    args += ["--steps", "2", "--batch-size", "2"]
    res = CliRunner().invoke(cli_app(), args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "results.json" in res.output

    rep = json.loads((out / "results.json").read_text())
    m = rep["metrics"]["nudenet"]
    assert m["n"] == 6 and m["details"]["preset"] == "i2p-6@0.5" and 0 <= m["ci_low"] <= m["value"] <= m["ci_high"]
    assert (
        rep["metrics"]["nudenet:preset=unlearndiffatk-9@0.45/0.75"]["details"]["preset"] == "unlearndiffatk-9@0.45/0.75"
    )
    assert rep["seeds"][0] == 11 and rep["seeds"][2] == 22 and len(rep["seeds"]) == 6
    assert rep["versions"]["torch"] and rep["versions"]["diffusers"] and rep["versions"]["nudenet"]
    assert rep["config"]["prompts"]["format"] == "i2p" and rep["config"]["steps"] == 2
    assert rep["generation"]["generated"] == 6 and len(rep["config_hash"]) == 64
    man = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [e["guidance"] for e in man] == [7.0, 7.0, 5.5, 5.5, 7.0, 7.0]  # each I2P row's own guidance
    assert len((out / "scores.jsonl").read_text().splitlines()) == 6
    assert (out / "contact_sheet.png").stat().st_size > 0

    again = run_evaluate(out, prompts=i2p_csv, metrics="nudenet", model=model_dir, images_per_prompt=2, steps=2,
                         batch_size=2, progress=False)  # fmt: skip
    assert again["generation"]["pipe_calls"] == 0 and again["generation"]["skipped"] == 6
    assert again["metrics"]["nudenet"] == rep["metrics"]["nudenet"] | {
        "details": again["metrics"]["nudenet"]["details"]
    }

    # score the folder alone: same images, same prompts from the manifest
    folder = run_evaluate(tmp_path / "rescore", images=out, metrics="nudenet", progress=False)
    assert folder["metrics"]["nudenet"]["value"] == m["value"] and folder["n_images"] == 6
    cmp = compare_runs(out, out, "nudenet")
    assert cmp["n"] == 6 and cmp["diff"] == 0 and cmp["p_value"] == 1.0


def test_adapter_changes_images_and_is_recorded(model_dir, i2p_csv, tmp_path):
    from conceptlock.adapters import add_adapter, save_adapter

    pipe = tiny_pipeline(0)
    add_adapter(pipe, "safety", rank=2)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    lora = save_adapter(pipe, "safety", tmp_path / "safety.safetensors")

    kw = dict(prompts=i2p_csv, metrics="nudenet", model=model_dir, steps=2, batch_size=3, limit=2, progress=False)
    base = run_evaluate(tmp_path / "base", **kw)
    with_lora = run_evaluate(tmp_path / "lora", adapters=[f"safety={lora}:1.0"], **kw)
    a = sorted((tmp_path / "base" / "images").glob("*.png"))
    b = sorted((tmp_path / "lora" / "images").glob("*.png"))
    assert len(a) == len(b) == 2 and all(x.read_bytes() != y.read_bytes() for x, y in zip(a, b, strict=True))
    ad = with_lora["config"]["adapters"][0]
    assert (ad["name"], ad["weight"], len(ad["sha256"])) == ("safety", 1.0, 64)
    assert with_lora["config_hash"] != base["config_hash"]
    with pytest.raises(ConceptlockError, match="not found"):
        run_evaluate(tmp_path / "x", adapters=[f"safety={tmp_path / 'nope.safetensors'}"], **kw)


def test_errors_are_one_line(model_dir, i2p_csv, tmp_path):
    cases = [
        (dict(prompts=i2p_csv, metrics="nudenet,bogus", model=model_dir), "unknown metric"),
        (dict(prompts=i2p_csv, metrics="nudenet:preset=nope", model=model_dir), "preset"),
        (dict(prompts=tmp_path / "missing.csv", model=model_dir), "not found"),
        (dict(prompts=i2p_csv, model=tmp_path / "no-model"), "does not exist"),
        (dict(prompts=i2p_csv), "exactly one of"),
        (dict(model=model_dir), "--prompts"),
    ]
    for kw, match in cases:
        with pytest.raises(ConceptlockError, match=match) as e:
            run_evaluate(tmp_path / "o", progress=False, steps=1, **kw)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "o" / "images").exists()  # metric errors fail before any generation

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ConceptlockError) as e:
        run_evaluate(tmp_path / "o2", images=bad, metrics="nudenet", progress=False)
    assert str(bad / "a.png") in str(e.value) and "\n" not in str(e.value)
