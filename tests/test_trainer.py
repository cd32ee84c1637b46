"""The one training loop: exact resume, NaN stop with the last checkpoint intact, multi-process equivalence,
logs, and the config errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import write_image_folder
from safetensors.torch import load_file

from conceptlock.methods.base import Objective, get_objective, tokenize
from conceptlock.pipelines import ConceptlockError, tiny_pipeline
from conceptlock.train.data import BatchPlan, TensorDataset
from conceptlock.train.trainer import TrainConfig, TrainingError, train


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPUs are shared: one intra-op thread is several times faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(pipe, n: int = 6, size: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(11)
    prompts = [f"a {c} circle" for c in ("red", "blue", "green", "white", "black", "pink", "grey", "gold")][:n]
    return TensorDataset(
        latents=torch.randn(n, 4, size, size, generator=g),
        input_ids=tokenize(pipe.tokenizer, prompts),
        label=torch.tensor([i % 2 for i in range(n)]),
    )


def _weights(pipe, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(pipe.unet.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_steps_must_be_positive(tmp_path):
    pipe = tiny_pipeline(0)
    for steps in (0, -3):
        with pytest.raises(ConceptlockError, match="steps must be > 0"):
            train(pipe, "xattn", get_objective("finetune"), _data(pipe), TrainConfig(steps=steps), tmp_path)


def test_batch_must_split_over_processes_and_accumulation(tmp_path):
    pipe = tiny_pipeline(0)
    with pytest.raises(ConceptlockError, match="multiple of processes x accumulation"):
        train(
            pipe,
            "xattn",
            get_objective("finetune"),
            _data(pipe),
            TrainConfig(steps=1, batch_size=3, grad_accum=2),
            tmp_path,
        )


def test_batch_plan_is_independent_of_how_the_batch_is_split():
    ds = TensorDataset(x=torch.arange(10))
    one = BatchPlan(ds, batch_size=4, seed=3)
    whole = [one.batch(s, 0) for s in (1, 2, 3)]
    for world, accum in ((2, 1), (1, 2), (2, 2)):
        for s in (1, 2, 3):
            parts = [BatchPlan(ds, 4, accum, world, r, seed=3).batch(s, m) for m in range(accum) for r in range(world)]
            assert sorted(torch.cat([p["seed"] for p in parts]).tolist()) == sorted(whole[s - 1]["seed"].tolist())
            assert sorted(torch.cat([p["x"] for p in parts]).tolist()) == sorted(whole[s - 1]["x"].tolist())


CFG = dict(lr=1e-3, batch_size=2, grad_accum=2, lr_scheduler="cosine", warmup_steps=3, ema_decay=0.9, seed=5)


def test_resume_equals_straight_run(tmp_path):
    straight = tiny_pipeline(0)
    r1 = train(
        straight, "full", get_objective("finetune"), _data(straight), TrainConfig(steps=20, **CFG), tmp_path / "a"
    )
    pipe = tiny_pipeline(0)
    cfg = TrainConfig(steps=20, checkpoint_every=5, keep_checkpoints=2, stop_after=10, **CFG)
    r2 = train(pipe, "full", get_objective("finetune"), _data(pipe), cfg, tmp_path / "b")
    assert (r2.step, r2.finished) == (10, False)
    resumed = tiny_pipeline(0)  # a fresh process would start from the original model again
    cfg = TrainConfig(steps=20, checkpoint_every=5, keep_checkpoints=2, resume=True, **CFG)
    r3 = train(resumed, "full", get_objective("finetune"), _data(resumed), cfg, tmp_path / "b")
    assert (r3.step, r3.finished) == (20, True)
    a, b = _weights(straight, r1.trainable), _weights(resumed, r3.trainable)
    assert max((a[n] - b[n]).abs().max().item() for n in a) <= 1e-6
    rows_a, rows_b = _rows(r1.log), _rows(r3.log)
    assert [r["step"] for r in rows_b] == list(range(1, 21))
    assert all(abs(x["loss"] - y["loss"]) <= 1e-6 and x["lr"] == y["lr"] for x, y in zip(rows_a, rows_b, strict=True))
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_00000015", "step_00000020"]


class NaNAt(Objective):
    """Fine-tuning whose loss turns NaN at one step (a diverging run)."""

    name = "finetune"
    needs = ("input_ids", "latents|pixel_values")

    def __init__(self, bad_step: int):
        self.inner, self.bad_step = get_objective("finetune"), bad_step

    def loss(self, batch, ctx):
        loss = self.inner.loss(batch, ctx)
        return loss * float("nan") if ctx.step == self.bad_step else loss


def test_nan_loss_stops_naming_the_step_and_keeps_last_checkpoint(tmp_path):
    pipe = tiny_pipeline(0)
    cfg = TrainConfig(steps=10, lr=1e-3, batch_size=2, checkpoint_every=5)
    with pytest.raises(TrainingError, match=r"at step 7") as e:
        train(pipe, "xattn", NaNAt(7), _data(pipe), cfg, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "step_00000005" in msg
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step_00000005"]  # no half-written or NaN checkpoint
    ck = ckpts / "step_00000005"
    assert json.loads((ck / "meta.json").read_text())["step"] == 5
    assert all(torch.isfinite(v).all() for v in load_file(str(ck / "trainable.safetensors")).values())
    # the kept checkpoint is usable: resume from it with a healthy objective
    again = tiny_pipeline(0)
    r = train(
        again,
        "xattn",
        get_objective("finetune"),
        _data(again),
        TrainConfig(steps=6, lr=1e-3, batch_size=2, resume=True),
        tmp_path,
    )
    assert r.step == 6 and [row["step"] for row in _rows(r.log)] == [1, 2, 3, 4, 5, 6]


def test_log_has_step_loss_lr_and_objective_scalars(tmp_path):
    pipe = tiny_pipeline(0)
    r = train(
        pipe, "xattn", get_objective("lcfd-lt"), _data(pipe, 4), TrainConfig(steps=2, batch_size=2, lr=1e-4), tmp_path
    )
    rows = _rows(r.log)
    assert [row["step"] for row in rows] == [1, 2]
    assert {"loss", "lr", "mse", "con", "d_own", "d_other"} <= set(rows[0])
    run = json.loads((tmp_path / "train_config.json").read_text())
    assert run["params"] == "xattn" and run["objective"] == "lcfd-lt" and run["objective_config"]["lambda_tot"] == 5e-5


def test_gradient_checkpointing_gives_the_same_result(tmp_path):
    out = []
    for i, gc in enumerate((False, True)):
        pipe = tiny_pipeline(0)
        r = train(
            pipe,
            "full",
            get_objective("finetune"),
            _data(pipe, 2),
            TrainConfig(steps=2, batch_size=2, lr=1e-3, gradient_checkpointing=gc),
            tmp_path / str(i),
        )
        out.append(_weights(pipe, r.trainable))
    assert max((out[0][n] - out[1][n]).abs().max().item() for n in out[0]) <= 1e-6


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_lora_run_keeps_adapter_in_fp32(tmp_path, precision):
    """fp16 on a CPU gets no autocast from accelerate, so fp32 latents meet fp16 weights: the UNet call must cast
    its inputs to the frozen base's dtype, as diffusers' LoRA script does."""
    pipe = tiny_pipeline(0)
    r = train(
        pipe,
        "lora:task",
        get_objective("finetune"),
        _data(pipe, 2),
        TrainConfig(steps=2, batch_size=2, lr=1e-3, mixed_precision=precision),
        tmp_path,
    )
    assert r.finished and r.loss is not None and torch.isfinite(torch.tensor(r.loss))
    params = dict(pipe.unet.named_parameters())
    assert all(params[n].dtype == torch.float32 for n in r.trainable)
    assert pipe.unet.conv_in.weight.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    from conceptlock.methods.base import get_objective, tokenize
    from conceptlock.pipelines import tiny_pipeline
    from conceptlock.train.data import TensorDataset
    from conceptlock.train.trainer import TrainConfig, train

    def run(out, cpu=False):
        pipe = tiny_pipeline(0)
        g = torch.Generator().manual_seed(11)
        data = TensorDataset(latents=torch.randn(8, 4, 16, 16, generator=g),
                             input_ids=tokenize(pipe.tokenizer, [f"shape {i}" for i in range(8)]),
                             label=torch.tensor([0, 1] * 4))
        cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, seed=1, cpu=cpu)
        r = train(pipe, "xattn", get_objective("lcfd-lt", lambda_tot=1e-3), data, cfg, out)
        params = dict(pipe.unet.named_parameters())
        return r, {n: params[n].detach().contiguous() for n in r.trainable}

    if __name__ == "__main__":
        r, w = run(sys.argv[1])
        if r.is_main_process:
            save_file(w, sys.argv[1] + "/weights.safetensors")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    script = tmp_path / "mp_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(script),
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = load_file(str(tmp_path / "two" / "weights.safetensors"))
    sys.path.insert(0, str(tmp_path))
    try:
        import mp_train
    finally:
        sys.path.remove(str(tmp_path))
    r, one = mp_train.run(str(tmp_path / "one"), cpu=True)
    assert set(one) == set(two)
    assert max((one[n] - two[n]).abs().max().item() for n in one) <= 1e-5
    rows1, rows2 = _rows(tmp_path / "one" / "train_log.jsonl"), _rows(tmp_path / "two" / "train_log.jsonl")
    assert all(abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])) for a, b in zip(rows1, rows2, strict=True))
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["num_processes"] == 2


def test_task_adapter_trains_on_w0_with_safety_adapter_inactive(tmp_path):
    """Modular LoRA: training `task` on a pipeline that holds `safety` gives the same adapter as on bare W0,
    and leaves `safety` untouched."""
    from conceptlock.adapters import add_adapter

    with_safety = tiny_pipeline(0)
    add_adapter(with_safety, "safety")
    with torch.no_grad():
        for n, p in with_safety.unet.named_parameters():
            if ".safety." in n:
                p.normal_(0, 0.3)
    safety_before = {n: p.clone() for n, p in with_safety.unet.named_parameters() if ".safety." in n}
    bare = tiny_pipeline(0)
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3)
    r1 = train(with_safety, "lora:task", get_objective("finetune"), _data(with_safety, 2), cfg, tmp_path / "a")
    r2 = train(bare, "lora:task", get_objective("finetune"), _data(bare, 2), cfg, tmp_path / "b")
    a, b = _weights(with_safety, r1.trainable), _weights(bare, r2.trainable)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(a[n].abs().sum() > 0 for n in a if ".lora_B." in n)  # B starts at 0: the adapter did train
    params = dict(with_safety.unet.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in safety_before.items())


def test_cached_latents_train_exactly_like_encoding_every_step(tmp_path):
    from conceptlock.train.data import CachedLatents, ImageTextDataset

    folder = write_image_folder(tmp_path / "imgs")
    out, datasets = [], []
    for i, cache in enumerate((False, True)):
        pipe = tiny_pipeline(0)
        data = ImageTextDataset(folder, pipe.tokenizer, 32)
        calls = []
        orig = pipe.vae.encode
        pipe.vae.encode = lambda *a, _o=orig, _c=calls, **k: (_c.append(1), _o(*a, **k))[1]
        r = train(
            pipe,
            "lora:task",
            get_objective("finetune"),
            data,
            TrainConfig(steps=3, batch_size=2, lr=1e-3, cache_latents=cache),
            tmp_path / str(i),
        )
        out.append(_weights(pipe, r.trainable))
        datasets.append(len(calls))
    assert max((out[0][n] - out[1][n]).abs().max().item() for n in out[0]) <= 1e-6
    # without the cache every step encodes its batch; with it, the images are encoded once up front
    assert datasets[0] == 3 and datasets[1] == 1
    cached = CachedLatents(ImageTextDataset(folder, tiny_pipeline(0).tokenizer, 32), tiny_pipeline(0).vae)
    assert "pixel_values" not in cached[0] and cached[0]["latent_mean"].shape == (4, 16, 16)


def test_8bit_adam_without_bitsandbytes_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    pipe = tiny_pipeline(0)
    with pytest.raises(ConceptlockError, match="needs bitsandbytes"):
        train(
            pipe,
            "lora:task",
            get_objective("finetune"),
            _data(pipe, 2),
            TrainConfig(steps=1, batch_size=2, use_8bit_adam=True),
            tmp_path,
        )


def test_unet_attention_runs_through_pytorch_sdpa():
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = tiny_pipeline(0)
    procs = pipe.unet.attn_processors
    assert procs and all(isinstance(p, AttnProcessor2_0) for p in procs.values())


def test_train_fingerprint_ignores_execution_flags_and_old_records_compare_equal():
    from dataclasses import asdict

    from conceptlock.train.trainer import normalise_train_dict, train_fingerprint

    base = train_fingerprint(TrainConfig(steps=5, lr=1e-4))
    assert train_fingerprint(TrainConfig(steps=5, lr=1e-4, cache_latents=True, checkpoint_every=2)) == base
    assert train_fingerprint(TrainConfig(steps=5, lr=2e-4)) != base
    assert train_fingerprint(TrainConfig(steps=6, lr=1e-4)) != base
    # a record written by an older version held every field (JSON: tuples as lists) and lacked new ones
    old = json.loads(json.dumps(asdict(TrainConfig(steps=5, lr=1e-4))))
    del old["use_8bit_adam"]
    assert normalise_train_dict(old) == json.loads(json.dumps(base))
