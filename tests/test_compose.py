"""Modular LoRA at inference: composed folders equal W0 + dW_safe + dW_task exactly, match vanilla diffusers, fuse
safely, accept kohya files and negative weights, and refuse bad input in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conceptlock import adapters as A
from conceptlock.compose import ADAPTERS_FILE, load_model, read_composition, run_compose
from conceptlock.errors import ConceptlockError
from conceptlock.pipelines import load_pipeline, save_pipeline, tiny_pipeline


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPUs are shared: one intra-op thread is several times faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


X = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
T = torch.tensor([100, 700])
E = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
MOD = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"


def _unet_out(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe.unet(X, T, E).sample


def _adapter_file(path, name: str, rank: int, alpha: float, seed: int):
    pipe = tiny_pipeline(0)
    A.add_adapter(pipe, name, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return A.save_adapter(pipe, name, path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny base, a safety adapter (rank 4, alpha 8: scale 2) and a task adapter (rank 2, alpha 2)."""
    root = tmp_path_factory.mktemp("compose")
    save_pipeline(tiny_pipeline(0), root / "base")
    safety = _adapter_file(root / "safety.safetensors", "safety", 4, 8, 1)
    task = _adapter_file(root / "task.safetensors", "task", 2, 2, 2)
    return root, root / "base", safety, task


def _file_delta(path, module: str) -> torch.Tensor:
    """dW = (alpha / r) * up @ down for one module, read from the file alone (tensors + LoRA metadata)."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    sd = load_file(str(path))
    up, down = sd[f"unet.{module}.lora.up.weight"], sd[f"unet.{module}.lora.down.weight"]
    return meta["unet.lora_alpha"] / meta["unet.r"] * up @ down


def test_composed_folder_output_is_exactly_w0_plus_both_deltas(files, tmp_path):
    _, base, safety, task = files
    res = run_compose(base, [f"safety={safety}:1.0", f"task={task}:1.0"], tmp_path / "modular")
    assert not res.fused and [r.name for r in res.adapters] == ["safety", "task"]
    meta = json.loads((tmp_path / "modular" / ADAPTERS_FILE).read_text())
    assert [(e["name"], e["file"], e["weight"]) for e in meta["adapters"]] == [
        ("safety", "adapters/safety.safetensors", 1.0),
        ("task", "adapters/task.safetensors", 1.0),
    ]
    pipe, refs = load_model(tmp_path / "modular")
    assert [r.name for r in refs] == ["safety", "task"]
    mod = pipe.unet.get_submodule(MOD)
    x = torch.randn(3, mod.in_features, generator=torch.Generator().manual_seed(3))
    w0 = load_pipeline(base).unet.get_submodule(MOD).weight
    d_safe, d_task = _file_delta(safety, MOD), _file_delta(task, MOD)
    assert d_safe.abs().max() > 0.05 and d_task.abs().max() > 0.05
    with torch.no_grad():
        assert torch.allclose(mod(x), x @ w0.T + x @ d_safe.T + x @ d_task.T, atol=1e-5)
    # the whole UNet equals a UNet whose weights were merged by hand from the two files
    merged = load_pipeline(base)
    with torch.no_grad():
        for name, m in pipe.unet.named_modules():
            if hasattr(m, "lora_A"):
                merged.unet.get_submodule(name).weight += _file_delta(safety, name) + _file_delta(task, name)
    assert torch.allclose(_unet_out(pipe), _unet_out(merged), atol=1e-5)


def test_composition_gives_the_same_images_as_vanilla_diffusers(files, tmp_path):
    from diffusers import StableDiffusionPipeline

    _, base, safety, task = files
    run_compose(base, [f"safety={safety}", f"task={task}"], tmp_path / "modular")
    ours, _ = load_model(tmp_path / "modular")
    vanilla = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False)
    vanilla.set_progress_bar_config(disable=True)
    vanilla.load_lora_weights(str(safety), adapter_name="safety")
    vanilla.load_lora_weights(str(task), adapter_name="task")
    vanilla.set_adapters(["safety", "task"], adapter_weights=[1, 1])

    def image(pipe) -> np.ndarray:
        g = torch.Generator().manual_seed(7)
        return pipe("a red disc", num_inference_steps=2, generator=g, output_type="np").images[0]

    a, b = image(ours), image(vanilla)
    assert np.array_equal(a, b)
    plain = load_pipeline(base)
    assert not np.array_equal(a, image(plain))  # the adapters change the picture


def test_fused_folder_matches_composition_with_negative_weights(files, tmp_path):
    _, base, safety, task = files
    specs = [f"safety={safety}:1", f"task={task}:-1"]  # W0 + dW_safe - dW_task (Paper A's arithmetic)
    run_compose(base, specs, tmp_path / "unfused")
    res = run_compose(base, specs, tmp_path / "fused", fuse=True)
    assert res.fused and not (tmp_path / "fused" / ADAPTERS_FILE).exists()
    fused = load_pipeline(tmp_path / "fused")
    assert A.adapter_names(fused) == []
    composed, refs = load_model(tmp_path / "unfused")
    assert [r.weight for r in refs] == [1.0, -1.0]
    assert torch.allclose(_unet_out(fused), _unet_out(composed), atol=1e-4)
    only_minus, _ = load_model(base, [f"safety={safety}:-1"])  # W0 - dW_safe
    w0 = load_pipeline(base).unet.get_submodule(MOD).weight
    mod = only_minus.unet.get_submodule(MOD)
    x = torch.randn(2, mod.in_features)
    with torch.no_grad():
        assert torch.allclose(mod(x), x @ (w0 - _file_delta(safety, MOD)).T, atol=1e-5)


def test_kohya_task_adapter_is_accepted(files, tmp_path):
    _, base, safety, task = files
    kohya = {}
    for key, value in load_file(str(task)).items():
        module, _, kind = key[len("unet.") :].rpartition(".lora.")
        stem = "lora_unet_" + module.replace(".", "_")
        kohya[f"{stem}.lora_{kind.split('.')[0]}.weight"] = value
        kohya[f"{stem}.alpha"] = torch.tensor(2.0)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    a, _ = load_model(
        run_compose(base, [f"safety={safety}", f"task={tmp_path / 'kohya.safetensors'}"], tmp_path / "k").out
    )
    b, _ = load_model(base, [f"safety={safety}", f"task={task}"])
    assert torch.allclose(_unet_out(a), _unet_out(b), atol=1e-6)


def _one_line(fn, match: str) -> str:
    with pytest.raises(ConceptlockError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_nan_adapter_is_refused_by_safe_fusing(files, tmp_path):
    _, base, safety, _ = files
    sd = load_file(str(safety))
    key = next(k for k in sd if k.endswith("lora.up.weight"))
    sd[key][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    _one_line(
        lambda: run_compose(base, [f"safety={tmp_path / 'nan.safetensors'}"], tmp_path / "f", fuse=True), "NaN|nan"
    )
    assert not (tmp_path / "f").exists()


def test_bad_adapter_files_stop_before_writing(files, tmp_path):
    _, base, safety, _ = files
    save_file(
        {"unet.nowhere.lora.down.weight": torch.zeros(4, 8), "unet.nowhere.lora.up.weight": torch.zeros(8, 4)},
        str(tmp_path / "misfit.safetensors"),
    )
    _one_line(lambda: run_compose(base, [f"x={tmp_path / 'misfit.safetensors'}"], tmp_path / "o"), "fits no module")
    sd = load_file(str(safety))
    bad_rank = {k: (v[:, :3].contiguous() if ".up." in k else v) for k, v in sd.items()}
    save_file(bad_rank, str(tmp_path / "rank.safetensors"))
    _one_line(lambda: run_compose(base, [f"x={tmp_path / 'rank.safetensors'}"], tmp_path / "o"), "mismatch")
    _one_line(lambda: run_compose(base, [f"x={tmp_path / 'none.safetensors'}"], tmp_path / "o"), "not found")
    _one_line(lambda: run_compose(base, [f"a={safety}", f"a={safety}"], tmp_path / "o"), "already")
    _one_line(lambda: run_compose(base, [], tmp_path / "o"), "at least one")
    assert not (tmp_path / "o").exists()


def test_out_is_never_replaced_silently_and_tampering_is_detected(files, tmp_path):
    _, base, safety, _ = files
    out = run_compose(base, [f"safety={safety}"], tmp_path / "m").out
    _one_line(lambda: run_compose(base, [f"safety={safety}"], out), "already exists")
    run_compose(base, [f"safety={safety}:0.5"], out, overwrite=True)
    assert [r.weight for r in read_composition(out)] == [0.5]
    _one_line(lambda: run_compose(base, [f"safety={safety}"], base / "inside"), "inside")
    adapter = out / "adapters" / "safety.safetensors"
    sd = load_file(str(adapter))
    save_file({k: v + 1 for k, v in sd.items()}, str(adapter))
    _one_line(lambda: read_composition(out), "changed")


def test_compose_cli(files, tmp_path):
    from conceptlock.cli import app

    _, base, safety, task = files
    runner = CliRunner()
    helped = runner.invoke(app, ["compose", "--help"])
    assert helped.exit_code == 0 and "Example" in helped.output and "--fuse" in helped.output
    out = tmp_path / "cli"
    res = runner.invoke(
        app,
        [
            "compose",
            "--base",
            str(base),
            "--adapter",
            f"safety={safety}:1.0",
            "--adapter",
            f"task={task}",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert [r.name for r in read_composition(out)] == ["safety", "task"]


def test_evaluate_honours_a_composed_folder(files, tmp_path):
    """`evaluate --model COMPOSED` must score W0 + dW_safe + dW_task, not silently W0."""
    from conceptlock.commands.evaluate import run_evaluate

    csv = tmp_path / "p.csv"
    csv.write_text("prompt,seed\na red circle,1\na blue star,2\n")
    _, base, safety, task = files
    adapters = [f"safety={safety}:1.0", f"task={task}:1.0"]
    run_compose(base, adapters, tmp_path / "composed")
    kw = dict(prompts=csv, metrics=["nudenet"], steps=2, guidance=3.0, progress=False, contact_sheet=0)
    a = run_evaluate(tmp_path / "a", model=tmp_path / "composed", **kw)
    run_evaluate(tmp_path / "b", model=base, adapters=adapters, **kw)
    run_evaluate(tmp_path / "c", model=base, **kw)
    assert [x["name"] for x in a["config"]["adapters"]] == ["safety", "task"]
    ims = {k: [np.asarray(Image.open(p)) for p in sorted((tmp_path / k).glob("**/*.png"))] for k in "abc"}
    assert len(ims["a"]) == 2 and all(np.array_equal(x, y) for x, y in zip(ims["a"], ims["b"], strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(ims["a"], ims["c"], strict=True))
