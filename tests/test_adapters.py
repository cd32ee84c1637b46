"""Named LoRA adapters: files vanilla diffusers reads, kohya files, exact composition, fusing, strict loading."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conceptlock import adapters as A
from conceptlock.pipelines import ConceptlockError, tiny_pipeline


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
MOD = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


def _out(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe.unet(X, T, E).sample


def _randomise(pipe, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture
def trained():
    """A pipeline holding adapters a (rank 4, alpha 8: scale 2) and b (rank 2, alpha 2), random weights."""
    pipe = tiny_pipeline(0)
    A.add_adapter(pipe, "a", rank=4, alpha=8)
    _randomise(pipe, "a", 1)
    A.add_adapter(pipe, "b", rank=2, alpha=2)
    _randomise(pipe, "b", 2)
    return pipe


def _delta(pipe, module_name: str, adapter: str) -> torch.Tensor:
    """dW = (alpha / r) B A of one adapter on one module, computed from its weights and config."""
    mod = pipe.unet.get_submodule(module_name)
    cfg = pipe.unet.peft_config[adapter]
    return (cfg.lora_alpha / cfg.r) * mod.lora_B[adapter].weight @ mod.lora_A[adapter].weight


def test_saved_file_loads_in_vanilla_diffusers_with_same_output(trained, tmp_path):
    path = A.save_adapter(trained, "a", tmp_path / "safety.safetensors")
    assert path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["safety.safetensors"]  # no temp left
    A.compose(trained, {"a": 1.0})
    vanilla = tiny_pipeline(0)
    vanilla.load_lora_weights(str(path), adapter_name="safety")  # plain diffusers, not our loader
    assert vanilla.unet.peft_config["safety"].lora_alpha == 8  # alpha != rank survives via metadata
    assert torch.allclose(_out(vanilla), _out(trained), atol=1e-6)
    assert not torch.allclose(_out(vanilla), _out(tiny_pipeline(0)), atol=1e-3)  # the adapter does something


def test_save_into_folder_names_file_after_adapter(trained, tmp_path):
    assert A.save_adapter(trained, "b", tmp_path) == tmp_path / "b.safetensors"


def test_kohya_file_is_accepted(trained, tmp_path):
    diffusers_file = A.save_adapter(trained, "a", tmp_path / "a.safetensors")
    kohya = {}
    for key, value in load_file(str(diffusers_file)).items():  # unet.<module>.lora.{down,up}.weight
        module, _, kind = key[len("unet.") :].rpartition(".lora.")
        base = "lora_unet_" + module.replace(".", "_")
        kohya[f"{base}.lora_{kind.split('.')[0]}.weight"] = value
        kohya[f"{base}.alpha"] = torch.tensor(8.0)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    pipe = tiny_pipeline(0)
    A.load_adapter(pipe, tmp_path / "kohya.safetensors", "k")
    A.compose(trained, {"a": 1.0})
    assert torch.allclose(_out(pipe), _out(trained), atol=1e-6)


def test_composition_is_exact_sum_of_deltas(trained):
    A.compose(trained, {"a": 1.0, "b": 1.0})
    mod = trained.unet.get_submodule(MOD)
    x = torch.randn(3, mod.in_features)
    w0 = mod.base_layer.weight
    expected = x @ w0.T + x @ _delta(trained, MOD, "a").T + x @ _delta(trained, MOD, "b").T
    with torch.no_grad():
        assert torch.allclose(mod(x), expected, atol=1e-6)
        A.compose(trained, {"a": -1.0})  # negative weights subtract
        assert torch.allclose(mod(x), x @ w0.T - x @ _delta(trained, MOD, "a").T, atol=1e-6)


def test_composed_unet_equals_manually_merged_weights(trained):
    A.compose(trained, {"a": 1.0, "b": 1.0})
    merged = tiny_pipeline(0)
    targets = {n for n, m in trained.unet.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for n in targets:
            w = merged.unet.get_submodule(n).weight
            w += _delta(trained, n, "a") + _delta(trained, n, "b")
    assert torch.allclose(_out(trained), _out(merged), atol=1e-5)


def test_loaded_files_compose_like_in_memory_adapters(trained, tmp_path):
    A.save_adapter(trained, "a", tmp_path / "a.safetensors")
    A.save_adapter(trained, "b", tmp_path / "b.safetensors")
    pipe = tiny_pipeline(0)
    A.apply_adapters(pipe, [f"safety={tmp_path / 'a.safetensors'}", f"task={tmp_path / 'b.safetensors'}:0.5"])
    A.compose(trained, {"a": 1.0, "b": 0.5})
    assert torch.allclose(_out(pipe), _out(trained), atol=1e-6)


def test_fuse_matches_composed_and_leaves_plain_weights(trained):
    A.compose(trained, {"a": 1.0, "b": 1.0})
    composed = _out(trained)
    A.fuse(trained, {"a": 1.0, "b": 1.0})
    assert A.adapter_names(trained) == []
    assert not any("lora" in n for n, _ in trained.unet.named_parameters())
    assert torch.allclose(_out(trained), composed, atol=1e-4), (_out(trained) - composed).abs().max()


def _one_line_error(pipe, path) -> str:
    with pytest.raises(ConceptlockError) as e:
        A.load_adapter(pipe, path, "x")
    assert "\n" not in str(e.value)
    assert A.adapter_names(pipe) == []  # nothing half-loaded
    return str(e.value)


def test_file_fitting_no_module_is_rejected(tmp_path):
    save_file(
        {"unet.foo.bar.lora.down.weight": torch.zeros(4, 8), "unet.foo.bar.lora.up.weight": torch.zeros(8, 4)},
        str(tmp_path / "bad.safetensors"),
    )
    assert "fits no module" in _one_line_error(tiny_pipeline(0), tmp_path / "bad.safetensors")


def test_shape_and_rank_mismatch_are_rejected(trained, tmp_path):
    sd = load_file(str(A.save_adapter(trained, "a", tmp_path / "a.safetensors")))
    wide = {k: (torch.zeros(v.shape[0], v.shape[1] + 3) if ".down." in k else v) for k, v in sd.items()}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    assert "mismatch" in _one_line_error(tiny_pipeline(0), tmp_path / "wide.safetensors")
    ranks = {k: (v[:, :3].contiguous() if ".up." in k else v) for k, v in sd.items()}
    save_file(ranks, str(tmp_path / "rank.safetensors"))
    assert "mismatch" in _one_line_error(tiny_pipeline(0), tmp_path / "rank.safetensors")


def test_partially_fitting_file_is_rejected(trained, tmp_path):
    sd = load_file(str(A.save_adapter(trained, "a", tmp_path / "a.safetensors")))
    sd["unet.nowhere.lora.down.weight"] = torch.zeros(4, 8)
    save_file(sd, str(tmp_path / "part.safetensors"))
    assert "fit" in _one_line_error(tiny_pipeline(0), tmp_path / "part.safetensors")


def test_missing_file_and_unknown_adapter_errors(tmp_path):
    pipe = tiny_pipeline(0)
    _one_line_error(pipe, tmp_path / "nope.safetensors")
    with pytest.raises(ConceptlockError, match="not loaded"):
        A.compose(pipe, {"ghost": 1.0})


def test_sdxl_lora_on_sd1_and_the_reverse_name_both_architectures(tmp_path):
    sd1, xl = tiny_pipeline(0), tiny_pipeline(0, arch="sdxl")
    A.add_adapter(sd1, "s", rank=2, alpha=2)
    A.add_adapter(xl, "x", rank=2, alpha=2)
    f_sd1 = A.save_adapter(sd1, "s", tmp_path / "sd1.safetensors")
    f_xl = A.save_adapter(xl, "x", tmp_path / "xl.safetensors")
    msg = _one_line_error(tiny_pipeline(0), f_xl)
    assert "architecture mismatch" in msg and "width 64" in msg and "SD 1.x/2.x (cross-attention width 32)" in msg
    msg = _one_line_error(tiny_pipeline(0, arch="sdxl"), f_sd1)
    assert "architecture mismatch" in msg and "the model is SDXL (cross-attention width 64)" in msg
    # each file still loads into its own architecture
    assert A.load_adapter(tiny_pipeline(0, arch="sdxl"), f_xl, "x") == "x"
