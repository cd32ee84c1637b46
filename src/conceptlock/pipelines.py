"""Load and save Stable Diffusion pipelines; build tiny random ones from configs for tests.

A model is always a diffusers pipeline folder on disk (or a hub id on a user's machine). The tiny
builders follow diffusers' own pipeline tests: real classes, tiny configs, random weights, seeded,
so every code path the real SD 1.x runs through is exercised on a CPU in milliseconds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import SafetensorError
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .errors import ConceptlockError
from .io import replace_dir

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def unet_config(
    sample_size: int = 16,
    channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 64,
    layers_per_block: int = 1,
    heads: int = 4,
) -> dict:
    """A small SD-1.x-shaped UNet config: cross-attention in every block but the last down."""
    n = len(channels)
    down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"] if n > 1 else ["CrossAttnDownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1) if n > 1 else ["CrossAttnUpBlock2D"]
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        norm_num_groups=min(8, channels[0]),
    )


def vae_config(sample_size: int = 32, channels: tuple[int, ...] = (32, 64), latent_channels: int = 4) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=min(16, channels[0]),
        sample_size=sample_size,
        mid_block_add_attention=False,
    )


def text_config(hidden: int = 64, layers: int = 2, heads: int = 4, max_len: int = 77) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_len,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=hidden,
    )


def scheduler_for_inference(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(
        **SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type
    )


def scheduler_for_training() -> DDPMScheduler:
    return DDPMScheduler(**SD_BETAS, clip_sample=False)


def tiny_pipeline(
    seed: int = 0, resolution: int = 32, prediction_type: str = "epsilon", arch: str = "sd1"
) -> StableDiffusionPipeline:
    """A random tiny SD pipeline with the real architecture's distinguishing features.

    `arch="sd1"`: SD 1.x (CLIP ViT-L text: quick_gelu; conv projections in the transformer blocks).
    `arch="sd2"`: SD 2.x (OpenCLIP ViT-H text: gelu; linear projections in the transformer blocks), which
    with `prediction_type="v_prediction"` is SD 2.x-768 (the default for sd2).
    `arch="sdxl"`: SDXL, see `tiny_sdxl_pipeline`.
    """
    if arch == "sdxl":
        return tiny_sdxl_pipeline(seed, resolution, prediction_type)
    if arch not in ("sd1", "sd2"):
        raise ConceptlockError(f"arch must be 'sd1', 'sd2' or 'sdxl', got {arch!r}")
    torch.manual_seed(seed)
    ucfg = unet_config(sample_size=resolution // 2, channels=(16, 32), heads=2, cross_attention_dim=32)
    tcfg = text_config(hidden=32, layers=2, heads=2)
    if arch == "sd2":
        ucfg["use_linear_projection"] = True
        tcfg.hidden_act = "gelu"
    unet = UNet2DConditionModel(**ucfg)
    vae = AutoencoderKL(**vae_config(sample_size=resolution, channels=(16, 32)))
    text = CLIPTextModel(tcfg)
    sched = scheduler_for_inference(prediction_type)
    from .world.tokenizer import clip_tokenizer

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(
    seed: int = 0, resolution: int = 32, prediction_type: str = "epsilon"
) -> StableDiffusionXLPipeline:
    """A random tiny SDXL pipeline, shaped as diffusers' SDXL tests shape theirs: two text encoders (the second
    with a pooled projection; SDXL pads it with '!'), their penultimate states concatenated for cross-attention,
    the pooled embedding and six time ids added to the timestep embedding (`addition_embed_type="text_time"`),
    no attention at the highest resolution, linear projections and two transformer layers deeper down."""
    from .world.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    hidden, pooled, time_dim = 32, 32, 8
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * hidden,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(**vae_config(sample_size=resolution, channels=(16, 32)))
    tcfg = text_config(hidden=hidden, layers=2, heads=2)
    tcfg.hidden_act = "gelu"
    tcfg.projection_dim = pooled
    text, text_2 = CLIPTextModel(tcfg), CLIPTextModelWithProjection(tcfg)
    tok_2 = clip_tokenizer()
    tok_2.pad_token = "!"
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=tok_2,
        unet=unet,
        scheduler=scheduler_for_inference(prediction_type),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_class(ref: str | Path) -> type:
    """StableDiffusionXLPipeline or StableDiffusionPipeline, from a folder's model_index.json (SD if unknown)."""
    index = Path(ref) / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    except json.JSONDecodeError:
        name = ""
    return StableDiffusionXLPipeline if name.startswith("StableDiffusionXL") else StableDiffusionPipeline


def _load_kwargs(cls: type, dtype: torch.dtype) -> dict:
    if cls is StableDiffusionXLPipeline:  # SDXL has no safety checker component
        return dict(dtype=dtype)
    return dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)


_REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_pipeline_folder(path: str | Path) -> Path:
    """Fail with one line if `path` is not a diffusers SD pipeline folder; name what is missing."""
    p = Path(path)
    if not p.is_dir():
        raise ConceptlockError(f"{p}: model folder does not exist")
    index = p / "model_index.json"
    if not index.is_file():
        raise ConceptlockError(f"{p}: not a diffusers pipeline folder (no model_index.json)")
    try:
        meta = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ConceptlockError(f"{index}: unreadable model_index.json ({e.msg})") from None
    for comp in _REQUIRED:
        if comp not in meta or meta[comp] in (None, [None, None]) or not (p / comp).is_dir():
            raise ConceptlockError(f"{p}: pipeline component {comp!r} is missing")
    return p


def _looks_like_hub_id(ref: str) -> bool:
    """`org/name` with no such local path: what diffusers would resolve on the Hub."""
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not Path(ref).exists() and not ref.startswith((".", "~"))


MODEL_CONFIG_ENV = "CONCEPTLOCK_MODEL_CONFIG"


def load_pipeline(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    revision: str | None = None,
    variant: str | None = None,
    local_files_only: bool | None = None,
    config: str | Path | None = None,
) -> StableDiffusionPipeline:
    """Load an SD pipeline from a local folder, a hub id or a single-file checkpoint.

    Safetensors only and never remote code, whichever the source. A hub id resolves through the
    Hugging Face cache (downloading on a connected machine); offline with no cached copy the error
    says so and how to point at a folder instead. A single file must be `.safetensors` (a `.ckpt`
    is a pickle and is refused); `config` names the pipeline folder or hub id whose configs it
    follows, which diffusers needs when it cannot fetch them (default: $CONCEPTLOCK_MODEL_CONFIG, which
    the CLI's global `--model-config` sets, so every command's `--model FILE` can use it).
    """
    ref = str(path)
    if Path(ref).is_file() or Path(ref).suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        config = config if config is not None else os.environ.get(MODEL_CONFIG_ENV) or None
        pipe = _load_single_file(Path(ref), dtype, config, local_files_only)
    elif _looks_like_hub_id(ref):
        pipe = _load_hub(ref, dtype, revision, variant, local_files_only)
    else:
        p = check_pipeline_folder(ref)
        cls = pipeline_class(p)
        pipe = cls.from_pretrained(str(p), use_safetensors=True, variant=variant, **_load_kwargs(cls, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _offline_error(ref: str) -> ConceptlockError:
    return ConceptlockError(
        f"--model {ref}: no such local folder, and as a hub id it is not in the local Hugging Face cache "
        "and the Hub cannot be reached (offline?); "
        "download it on a connected machine (e.g. `huggingface-cli download "
        f"{ref}`) or pass a local diffusers pipeline folder"
    )


def _hub_class(ref: str, revision, local_files_only) -> type:
    """The pipeline class a hub id's model_index.json names (from the cache when offline); SD if unreadable."""
    try:
        from huggingface_hub import hf_hub_download

        index = hf_hub_download(ref, "model_index.json", revision=revision, local_files_only=bool(local_files_only))
        return pipeline_class(Path(index).parent)
    except Exception:  # any failure here resurfaces, explained, from from_pretrained below
        return StableDiffusionPipeline


def _load_hub(ref: str, dtype: torch.dtype, revision, variant, local_files_only) -> StableDiffusionPipeline:
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    cls = _hub_class(ref, revision, local_files_only)
    kw = _load_kwargs(cls, dtype)
    try:
        return cls.from_pretrained(
            ref, revision=revision, variant=variant, use_safetensors=True, local_files_only=local_files_only, **kw
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError) as e:
        raise _offline_error(ref) from e
    except HFValidationError as e:
        raise ConceptlockError(f"--model {ref}: not a local folder and not a valid hub id") from e
    except OSError as e:  # diffusers wraps most resolution failures in OSError
        msg = str(e)
        if "offline" in msg.lower() or "connect" in msg.lower() or "cache" in msg.lower():
            raise _offline_error(ref) from e
        raise ConceptlockError(f"--model {ref}: {msg.splitlines()[0] if msg else type(e).__name__}") from e


def _single_file_class(path: Path, config) -> type:
    """SDXL when the checkpoint holds a second text embedder (its original key layout) or --config says so."""
    if config is not None and pipeline_class(config) is StableDiffusionXLPipeline:
        return StableDiffusionXLPipeline
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        if any(k.startswith("conditioner.embedders.1.") for k in f.keys()):
            return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def _load_single_file(path: Path, dtype: torch.dtype, config, local_files_only) -> StableDiffusionPipeline:
    if path.suffix != ".safetensors":
        raise ConceptlockError(
            f"{path}: single-file checkpoints must be .safetensors (pickled .ckpt/.pt/.bin files can run code "
            "when loaded); convert it first"
        )
    if not path.is_file():
        raise ConceptlockError(f"{path}: checkpoint file does not exist")
    extra = {"config": str(config)} if config is not None else {}
    try:
        cls = _single_file_class(path, config)
        return cls.from_single_file(str(path), local_files_only=local_files_only, **extra, **_load_kwargs(cls, dtype))
    except (OSError, ValueError, SafetensorError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConceptlockError(
            f"{path}: cannot load as a single-file SD checkpoint ({first}); name the pipeline folder or hub id "
            "whose configs it follows with `conceptlock --model-config DIR ...` (or $CONCEPTLOCK_MODEL_CONFIG)"
        ) from e


def save_pipeline(pipe: StableDiffusionPipeline, out: str | Path, overwrite: bool = False) -> Path:
    """Save atomically: write into a temp folder beside `out`, then rename it into place.

    An existing `out` is only replaced when `overwrite` is set, so a user's model is never lost.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConceptlockError(f"{out}: already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
