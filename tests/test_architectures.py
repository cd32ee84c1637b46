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


@pytest.mark.parametrize(
    "arch,prediction_type", [("sd1", "epsilon"), ("sd2", "v_prediction")], ids=["sd1-eps", "sd2-vpred"]
)
def test_align_finetune_compose_evaluate(tmp_path, arch, prediction_type):
    from conceptlock.align import run_align
    from conceptlock.commands.evaluate import run_evaluate
    from conceptlock.compose import run_compose
    from conceptlock.finetune import run_finetune

    base = save_pipeline(tiny_pipeline(seed=1, arch=arch, prediction_type=prediction_type), tmp_path / "base")
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
    out = composed.out if hasattr(composed, "out") else tmp_path / "served"

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
