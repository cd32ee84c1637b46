"""Which parameters train: ESD groups select the right tensors, LoRA adds a frozen-base adapter on W0."""

from __future__ import annotations

import pytest
import torch

from conceptlock.pipelines import ConceptlockError, tiny_pipeline
from conceptlock.train.params import apply_params, parse_params


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPUs are shared: one intra-op thread is several times faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def unet():
    return tiny_pipeline(0).unet


def _trainable(unet) -> set[str]:
    return {n for n, p in unet.named_parameters() if p.requires_grad}


def test_parse_accepts_groups_and_lora():
    assert parse_params("xattn").kind == "xattn"
    spec = parse_params("lora:safety", rank=8, alpha=16, targets=["to_k"])
    assert (spec.kind, spec.adapter, spec.rank, spec.alpha, spec.targets) == ("lora", "safety", 8, 16, ("to_k",))
    assert str(spec) == "lora:safety"


@pytest.mark.parametrize("bad", ["everything", "lora:", "lora:a b", "attn2"])
def test_parse_rejects_unknown_specs_in_one_line(bad):
    with pytest.raises(ConceptlockError) as e:
        parse_params(bad)
    assert "\n" not in str(e.value)


def test_full_trains_everything(unet):
    chosen = apply_params(unet, "full")
    assert len(chosen) == len(list(unet.parameters()))


def test_xattn_selects_only_cross_attention(unet):
    names = {n for n, _ in apply_params(unet, "xattn")}
    assert names and all("attn2." in n for n in names)
    assert names == _trainable(unet)
    assert any("attn2.to_q" in n for n in names) and any("attn2.to_out" in n for n in names)


def test_xattn_kv_selects_only_keys_and_values(unet):
    names = {n for n, _ in apply_params(unet, "xattn-kv")}
    assert names and all(("attn2.to_k." in n or "attn2.to_v." in n) for n in names)
    assert names == _trainable(unet)


def test_noxattn_is_esd_u(unet):
    names = {n for n, _ in apply_params(unet, "noxattn")}
    assert not any("attn2." in n for n in names)
    assert not any(n.startswith(("time_embedding.", "conv_out.")) for n in names)
    assert any(n.startswith("conv_in.") for n in names) and any("attn1." in n for n in names)
    assert names == _trainable(unet)


def test_lora_adds_adapter_with_frozen_base_and_no_initial_change(unet):
    x, t, e = torch.randn(1, 4, 16, 16), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = unet(x, t, e).sample
    chosen = apply_params(unet, "lora:safety")
    names = {n for n, _ in chosen}
    assert names == _trainable(unet)
    assert all(".lora_A.safety." in n or ".lora_B.safety." in n for n in names)
    # default targets: to_q, to_k, to_v, to_out.0 in both attentions
    for target in ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v"):
        assert any(target + ".lora_A" in n for n in names)
    with torch.no_grad():
        assert torch.equal(unet(x, t, e).sample, before)  # B = 0 at init


def test_lora_targets_matching_nothing_is_one_line_error(unet):
    with pytest.raises(ConceptlockError, match="match no module") as e:
        apply_params(unet, parse_params("lora:x", targets=["to_nothing"]))
    assert "\n" not in str(e.value)


def test_new_adapter_trains_on_w0_with_existing_adapter_inactive(unet):
    apply_params(unet, "lora:safety")
    chosen = apply_params(unet, "lora:task")
    assert unet.active_adapters() == ["task"]
    assert not any(".safety." in n for n, _ in chosen)
    assert not any(".safety." in n for n in _trainable(unet))


def test_duplicate_adapter_name_is_an_error(unet):
    apply_params(unet, "lora:safety")
    with pytest.raises(ConceptlockError, match="already exists"):
        apply_params(unet, "lora:safety")
