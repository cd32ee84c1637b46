"""`run_finetune` / `conceptlock finetune`: modular training sees W0 only, standard sees W0 + dW_safe, the safety
adapter never changes, artefacts load in vanilla diffusers, resume is exact, bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conceptlock import adapters as A
from conceptlock.errors import ConceptlockError
from conceptlock.finetune import resolve_data, run_finetune
from conceptlock.pipelines import load_pipeline, save_pipeline, tiny_pipeline


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPUs are shared: one intra-op thread is several times faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _image_folder(folder, n: int = 4, seed: int = 0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a pixel art of shape {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A saved tiny base, an image folder, and a safety adapter with UNet *and* text-encoder parts."""
    root = tmp_path_factory.mktemp("ft")
    save_pipeline(tiny_pipeline(0), root / "base")
    data = _image_folder(root / "data")
    pipe = tiny_pipeline(0)
    A.add_adapter(pipe, "safety")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if ".safety." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    sd = load_file(str(A.save_adapter(pipe, "safety", root / "unet_safety.safetensors")))
    for layer in range(2):  # diffusers-format text-encoder LoRA keys (rank 2)
        for proj in ("q_proj", "v_proj"):
            stem = f"text_encoder.text_model.encoder.layers.{layer}.self_attn.{proj}"
            sd[f"{stem}.lora_A.weight"] = torch.randn(2, 32, generator=g) * 0.3
            sd[f"{stem}.lora_B.weight"] = torch.randn(32, 2, generator=g) * 0.3
    save_file(sd, str(root / "safety.safetensors"))  # no LoRA metadata: alpha = rank (scale 1) everywhere
    return root, root / "base", data, root / "safety.safetensors"


class ForwardSpy:
    """A global forward hook on every LoRA layer that holds `safety`: checks, at each training forward, that the
    layer computes base(x) + the deltas of exactly the adapters in `active` (with their current weights)."""

    def __init__(self, active: tuple[str, ...]):
        self.active, self.checked, self.max_err, self.safety_size, self.task_seen = active, 0, 0.0, 0.0, 0.0

    def __call__(self, mod, args, output):
        lora_a = getattr(mod, "lora_A", None)
        if lora_a is None or "safety" not in lora_a or not hasattr(mod, "base_layer"):
            return
        x = args[0]
        with torch.no_grad():
            expected = mod.base_layer(x)
            for a in self.active:
                if a in lora_a:
                    delta = mod.lora_B[a](lora_a[a](x)) * mod.scaling[a]
                    expected = expected + delta
                    if a == "task":
                        self.task_seen = max(self.task_seen, delta.abs().max().item())
            safety = mod.lora_B["safety"](lora_a["safety"](x)) * mod.scaling["safety"]
        self.checked += 1
        self.max_err = max(self.max_err, (output.detach() - expected).abs().max().item())
        self.safety_size = max(self.safety_size, safety.abs().max().item())


@pytest.mark.parametrize(
    ("mode", "active"), [(None, ("task",)), ("standard", ("safety", "task"))], ids=["modular", "standard"]
)
def test_task_training_sees_w0_or_w0_plus_safety_and_safety_never_changes(env, tmp_path, mode, active):
    _, base, data, safety = env
    spy = ForwardSpy(active)
    handle = torch.nn.modules.module.register_module_forward_hook(spy)
    try:
        res = run_finetune(base, data, tmp_path / "run", adapters=[f"safety={safety}"], mode=mode, steps=2, lr=1e-2)
    finally:
        handle.remove()
    assert res.mode == (mode or "modular") and res.finished
    assert spy.checked >= 2 * 2 * 8  # UNet and text-encoder layers, every training forward
    assert spy.safety_size > 0.05  # the safety adapter would have been visible had it been active
    assert spy.task_seen > 1e-4  # the task adapter had moved and was part of the forward
    assert spy.max_err < 1e-5, spy.max_err
    # the safety adapter's tensors are the file's, bit for bit
    from peft.utils import get_peft_model_state_dict

    now = get_peft_model_state_dict(res.pipe.unet, adapter_name="safety")
    theirs = {k: v for k, v in load_file(str(safety)).items() if k.startswith("unet.")}
    assert len(now) == len(theirs) and all(any(torch.equal(v, w) for w in theirs.values()) for v in now.values())
    # the artefact is a task LoRA that vanilla diffusers loads, and the recipe composes it with safety
    assert res.artifact == tmp_path / "run" / "task.safetensors"
    vanilla = tiny_pipeline(0)
    vanilla.load_lora_weights(str(safety), adapter_name="safety")
    vanilla.load_lora_weights(str(res.artifact), adapter_name="task")
    vanilla.set_adapters(["safety", "task"], adapter_weights=[1, 1])
    x, t, e = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.allclose(vanilla.unet(x, t, e).sample, res.pipe.unet(x, t, e).sample, atol=1e-5)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["finished"] and cfg["mode"] == res.mode and cfg["adapters"][0]["name"] == "safety"
    assert cfg["inference"]["adapters"] == [f"safety={safety}:1", f"task={res.artifact}:1"]
    assert len((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) == 2


def test_modular_and_standard_task_adapters_differ(env, tmp_path):
    _, base, data, safety = env
    kw = dict(adapters=[f"safety={safety}"], steps=2, lr=1e-2)
    a = load_file(str(run_finetune(base, data, tmp_path / "m", **kw).artifact))
    b = load_file(str(run_finetune(base, data, tmp_path / "s", mode="standard", **kw).artifact))
    assert any(not torch.allclose(a[k], b[k]) for k in a)  # what the task saw while training matters


def test_full_finetune_fuses_safety_first_and_writes_a_pipeline(env, tmp_path):
    root, base, data, safety = env
    unet_only = root / "unet_safety.safetensors"
    res = run_finetune(base, data, tmp_path / "full", params="full", adapters=[f"safety={unet_only}"], steps=1)
    assert res.mode == "standard" and res.artifact == tmp_path / "full" / "model"
    tuned = load_pipeline(res.artifact)
    assert A.adapter_names(tuned) == [] and res.config["inference"] == {
        "model": str(res.artifact),
        "adapters": [],
        "carried": [],
    }
    fused = load_pipeline(base)
    A.apply_adapters(fused, [f"safety={unet_only}"])
    A.fuse(fused, {"safety": 1.0})
    w_fused = fused.unet.state_dict()["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    w_tuned = tuned.unet.state_dict()["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    w0 = load_pipeline(base).unet.state_dict()["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    # one step at lr 1e-5 moves the weights by ~1e-5; the fused safety delta is far larger
    assert (w_tuned - w_fused).abs().max() < 1e-3 < (w_tuned - w0).abs().max()


def test_a_composed_folder_carries_its_adapters_into_modular_training(env, tmp_path):
    from conceptlock.compose import run_compose

    root, base, data, _ = env
    composed = run_compose(base, [f"safety={root / 'unet_safety.safetensors'}:0.5"], tmp_path / "composed").out
    res = run_finetune(composed, data, tmp_path / "run", steps=1)
    assert res.mode == "modular" and [a["name"] for a in res.config["adapters"]] == ["safety"]
    carried = f"safety={composed / 'adapters' / 'safety.safetensors'}:0.5"
    assert res.config["inference"] == {
        "model": str(composed),
        "adapters": [f"task={res.artifact}:1"],
        "carried": [carried],
    }
    # the recipe rebuilds the fine-tuned model: the folder brings safety, --adapter adds the task
    from conceptlock.compose import load_model

    rebuilt, refs = load_model(composed, res.config["inference"]["adapters"])
    assert [(r.name, r.weight) for r in refs] == [("safety", 0.5), ("task", 1.0)]
    x, t, e = torch.randn(1, 4, 16, 16), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt.unet(x, t, e).sample, res.pipe.unet(x, t, e).sample, atol=1e-5)


def test_resume_equals_a_straight_run(env, tmp_path):
    _, base, data, _ = env
    straight = run_finetune(base, data, tmp_path / "a", steps=3, lr=1e-3)
    kw = dict(steps=3, lr=1e-3, train_kwargs={"checkpoint_every": 1})
    part = run_finetune(base, data, tmp_path / "b", **{**kw, "train_kwargs": {"checkpoint_every": 1, "stop_after": 1}})
    assert not part.finished and not part.artifact.exists()
    with pytest.raises(ConceptlockError, match="already holds"):
        run_finetune(base, data, tmp_path / "b", **kw)
    with pytest.raises(ConceptlockError, match="different params"):
        run_finetune(base, data, tmp_path / "b", params="lora:other", resume=True, **kw)
    resumed = run_finetune(base, data, tmp_path / "b", resume=True, **kw)
    assert resumed.finished
    a, b = load_file(str(straight.artifact)), load_file(str(resumed.artifact))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_toy_data_names_resolve_in_the_current_world(micro_world, monkeypatch, tmp_path):
    import conceptlock.world as W

    monkeypatch.setattr(W, "_CURRENT", micro_world)
    assert resolve_data("toy:domain-mosaic") == micro_world / "data" / "domain-mosaic"
    with pytest.raises(ConceptlockError, match="known: .*malicious-gore") as e:
        resolve_data("toy:pokemon")
    assert "\n" not in str(e.value)
    res = run_finetune(micro_world / "pipeline", "toy:malicious-gore", tmp_path / "mal", steps=1, batch_size=2)
    assert res.finished and res.mode == "standard" and res.config["n_images"] > 0


def _one_line(fn, match: str) -> None:
    with pytest.raises(ConceptlockError, match=match) as e:
        fn()
    assert "\n" not in str(e.value), str(e.value)


def test_bad_data_is_a_one_line_error(env, tmp_path):
    _, base, _, _ = env
    go = lambda d: lambda: run_finetune(base, d, tmp_path / "o", steps=1)  # noqa: E731
    _one_line(go(tmp_path / "missing"), "does not exist")
    (tmp_path / "nometa").mkdir()
    _one_line(go(tmp_path / "nometa"), "no metadata.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("\n")
    _one_line(go(empty), "empty data set")
    holes = _image_folder(tmp_path / "holes", n=2)
    (holes / "1.png").unlink()
    _one_line(go(holes), "'1.png' not found")
    assert not (tmp_path / "o" / "task.safetensors").exists()


def test_bad_adapters_modes_and_outputs_are_one_line_errors(env, tmp_path):
    root, base, data, safety = env
    save_file(
        {"unet.nowhere.lora.down.weight": torch.zeros(4, 8), "unet.nowhere.lora.up.weight": torch.zeros(8, 4)},
        str(tmp_path / "misfit.safetensors"),
    )
    sd = load_file(str(root / "unet_safety.safetensors"))
    save_file({k: v[:, :3].contiguous() if ".up." in k else v for k, v in sd.items()}, str(tmp_path / "r.safetensors"))
    run = lambda **kw: lambda: run_finetune(**{"model": base, "data": data, "out": tmp_path / "o", "steps": 1, **kw})  # noqa: E731
    _one_line(run(adapters=[f"safety={tmp_path / 'misfit.safetensors'}"]), "fits no module")
    _one_line(run(adapters=[f"safety={tmp_path / 'r.safetensors'}"]), "mismatch")
    _one_line(run(adapters=[f"safety={tmp_path / 'nope.safetensors'}"]), "not found")
    _one_line(run(mode="modular"), "carries no adapter")
    _one_line(run(mode="sideways"), "modular or standard")
    _one_line(run(params="full", adapters=[f"safety={safety}"], mode="modular"), "standard by nature")
    _one_line(run(params="lora:safety", adapters=[f"safety={safety}"]), "already carries")
    _one_line(run(out=base), "input model")
    _one_line(run(out=tmp_path / "o", adapters=[f"task={tmp_path / 'o' / 'task.safetensors'}"]), "not found")


def test_finetune_cli(env, tmp_path):
    from conceptlock.cli import app

    _, base, data, safety = env
    runner = CliRunner()
    helped = runner.invoke(app, ["finetune", "--help"])
    assert helped.exit_code == 0 and "Example" in helped.output and "--mode" in helped.output
    args = ["finetune", "--model", str(base), "--data", str(data), "--adapter", f"safety={safety}", "--steps", "1"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "modular" in res.output and (tmp_path / "cli" / "task.safetensors").is_file()
    again = runner.invoke(app, [*args, "--out", str(tmp_path / "cli")])
    assert isinstance(again.exception, ConceptlockError)  # never replaced without --overwrite
