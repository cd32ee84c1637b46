"""One end-to-end run per real architecture (issue #8), on tiny random models built from configs the way
diffusers' own pipeline tests build theirs: align (safety LoRA), Modular LoRA fine-tuning, compose,
evaluate. SD 2.x runs with v-prediction, which every stage must honour."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from diffusers import StableDiffusionPipeline
from PIL import Image

from conceptlock.pipelines import save_pipeline, tiny_pipeline


def align_task_compose(base, tmp_path):
    """ESD safety LoRA (2 steps), a Modular task LoRA on it (2 steps), both composed: (safety, task, served)."""
    from conceptlock.align import run_align
    from conceptlock.compose import run_compose
    from conceptlock.finetune import run_finetune

    safety = run_align("esd", base, ["nudity"], tmp_path / "esd", params="lora:safety", steps=2, seed=0)
    assert safety.artifact.suffix == ".safetensors"
    log = [json.loads(x) for x in (tmp_path / "esd" / "train_log.jsonl").read_text().splitlines() if x.strip()]
    assert log and all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    task = run_finetune(
        base,
        write_image_folder(tmp_path / "data", text="a photo of a striped cat {i}"),
        tmp_path / "task",
        params="lora:task",
        adapters=[f"safety={safety.artifact}"],
        steps=2,
        batch_size=2,
    )
    composed = run_compose(base, [f"safety={safety.artifact}:1.0", f"task={task.artifact}:1.0"], tmp_path / "served")
    return safety, task, composed.out if hasattr(composed, "out") else tmp_path / "served"


@pytest.mark.parametrize(
    "arch,prediction_type", [("sd1", "epsilon"), ("sd2", "v_prediction")], ids=["sd1-eps", "sd2-vpred"]
)
def test_align_finetune_compose_evaluate(tmp_path, arch, prediction_type):
    from conceptlock.commands.evaluate import run_evaluate

    base = save_pipeline(tiny_pipeline(seed=1, arch=arch, prediction_type=prediction_type), tmp_path / "base")
    safety, task, out = align_task_compose(base, tmp_path)

    # the served model is a vanilla diffusers folder that keeps the architecture and prediction type
    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False)
    assert pipe.scheduler.config.prediction_type == prediction_type
    assert pipe.unet.config.use_linear_projection == (arch == "sd2")
    pipe.load_lora_weights(str(safety.artifact), adapter_name="safety")
    pipe.load_lora_weights(str(task.artifact), adapter_name="task")
    pipe.set_adapters(["safety", "task"], [1.0, 1.0])

    prompts = tmp_path / "p.csv"
    prompts.write_text(
        "prompt,evaluation_seed,evaluation_guidance,categories\nnude person,3,7.5,sexual\na cat,4,7.5,none\n"
    )
    res = run_evaluate(tmp_path / "eval", prompts=prompts, metrics=["nudenet"], model=out, steps=2, progress=False)
    m = res["metrics"]["nudenet"]
    assert m["n"] == 2 and 0.0 <= m["value"] <= 1.0 and m["ci_low"] <= m["value"] <= m["ci_high"]

    # and the evaluated images are those of vanilla diffusers with the same two adapters
    ours = np.asarray(Image.open(tmp_path / "eval" / "images" / "00000_00.png").convert("RGB"))
    g = torch.Generator().manual_seed(3)
    theirs = pipe("nude person", num_inference_steps=2, guidance_scale=7.5, generator=g, output_type="np").images[0]
    assert np.abs(ours.astype(float) - np.rint(theirs * 255)).max() <= 2


def test_sdxl_align_finetune_compose_evaluate(tmp_path):
    """SDXL end to end: both text encoders, pooled embedding and time ids reach the UNet in training (ESD safety
    LoRA, Modular LoRA task training) and the served composition equals vanilla diffusers' SDXL pipeline."""
    from diffusers import StableDiffusionXLPipeline

    from conceptlock.commands.evaluate import run_evaluate
    from conceptlock.pipelines import load_pipeline

    base = save_pipeline(tiny_pipeline(seed=1, arch="sdxl"), tmp_path / "base")
    assert isinstance(load_pipeline(base), StableDiffusionXLPipeline)
    safety, task, out = align_task_compose(base, tmp_path)

    pipe = StableDiffusionXLPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(safety.artifact), adapter_name="safety")
    pipe.load_lora_weights(str(task.artifact), adapter_name="task")
    pipe.set_adapters(["safety", "task"], [1.0, 1.0])
    # both adapters really changed the UNet (a LoRA trained on nothing would leave B = 0)
    lora_b = [p for n, p in pipe.unet.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.isfinite(p).all() for p in lora_b) and any(p.abs().sum() > 0 for p in lora_b)

    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,evaluation_seed,evaluation_guidance,categories\nnude person,3,5.0,sexual\n")
    res = run_evaluate(tmp_path / "eval", prompts=prompts, metrics=["nudenet"], model=out, steps=2, progress=False)
    assert res["metrics"]["nudenet"]["n"] == 1
    ours = np.asarray(Image.open(tmp_path / "eval" / "images" / "00000_00.png").convert("RGB"))
    g = torch.Generator().manual_seed(3)
    theirs = pipe("nude person", num_inference_steps=2, guidance_scale=5.0, generator=g, output_type="np").images[0]
    assert np.abs(ours.astype(float) - np.rint(theirs * 255)).max() <= 2


def test_sdxl_conditioning_matches_diffusers():
    """The packed conditioning carries exactly what SDXL's pipeline computes, and the UNet call on it equals
    diffusers' own call with added_cond_kwargs."""
    from conceptlock.conditioning import encode_texts, time_ids, unet_forward

    pipe = tiny_pipeline(seed=2, arch="sdxl")
    emb = encode_texts(pipe, ["a red cat", ""])
    pe, npe, pooled, npooled = pipe.encode_prompt("a red cat", device="cpu", do_classifier_free_guidance=True)
    torch.testing.assert_close(emb[0, :-1], pe[0])
    torch.testing.assert_close(emb[0, -1, : pooled.shape[1]], pooled[0])
    torch.testing.assert_close(emb[1, :-1], npe[0])  # SDXL base: the empty prompt is zeros
    torch.testing.assert_close(emb[1, -1, : npooled.shape[1]], npooled[0])
    tids = time_ids(pipe)
    assert tids.tolist() == [32, 32, 0, 0, 32, 32]
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    ours = unet_forward(pipe.unet, x, t, emb[:1])
    theirs = pipe.unet(
        x, t, encoder_hidden_states=pe, added_cond_kwargs={"text_embeds": pooled, "time_ids": tids[None]}
    ).sample
    torch.testing.assert_close(ours, theirs)
    # and the pooled embedding matters: zeroing it changes the prediction
    assert not torch.allclose(unet_forward(pipe.unet, x, t, torch.cat([emb[:1, :-1], emb[1:, -1:]], 1)), ours)


@pytest.mark.parametrize("method,params", [("sdd", "xattn"), ("uce", None)])
def test_sdxl_other_methods_change_the_cross_attention(tmp_path, method, params):
    """SDD (trained through the packed conditioning) and UCE (closed form on the concatenated 2-encoder
    embeddings) both run on SDXL, edit attn2, and leave a pipeline vanilla diffusers loads as SDXL."""
    from diffusers import StableDiffusionXLPipeline

    from conceptlock.align import run_align

    base = save_pipeline(tiny_pipeline(seed=3, arch="sdxl"), tmp_path / "base")
    res = run_align(method, base, ["nudity"], tmp_path / method, params=params, steps=2 if params else None)
    edited = StableDiffusionXLPipeline.from_pretrained(str(res.artifact))
    before = StableDiffusionXLPipeline.from_pretrained(str(base))
    k = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    w_new, w_old = edited.unet.state_dict()[k], before.unet.state_dict()[k]
    assert w_new.shape == (w_old.shape[0], 64)  # keys read both encoders' states (32 + 32)
    assert not torch.equal(w_new, w_old)
