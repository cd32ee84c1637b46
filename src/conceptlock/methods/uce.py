"""UCE (unified concept editing, Gandikota et al. 2024): a closed-form, training-free edit of every
cross-attention key and value projection (``attn2.to_k``, ``attn2.to_v``) of the UNet.

For each projection W_old (d_out x d_in) it solves the ridge regression

    min_W  lam ||W - W_old||^2 + s_e sum_e ||W c_e - v*_e||^2 + s_p sum_p ||W c_p - W_old c_p||^2

whose solution is  W = (lam W_old + s_e sum_e v*_e c_e^T + s_p sum_p W_old c_p c_p^T)
                       (lam I + s_e sum_e c_e c_e^T + s_p sum_p c_p c_p^T)^-1,   v*_e = W_old c_guide(e).

So text that reads like an erased concept is projected to the keys and values of its guide (a
"clean" concept or the empty prompt), text in the preserve set keeps its keys and values, and
everything else moves as little as the regulariser ``lam`` allows. No image is generated, no
gradient is taken: it runs in well under a second on the toy model and in seconds on SD 1.x.

Which token embeddings c are edited (``tokens``, the choice UCE leaves to its code):

- ``"tail"`` (default, what UCE's released ``train_erase.py`` does): from the concept's last word
  token to the end of the padded sequence (its EOS and padding tokens), aligned from the end with
  the guide's. A causal CLIP text encoder writes the concept into every later position, and SD's
  UNet attends to all 77, so editing only the word token leaves the concept in the EOS/padding.
  Preserve texts contribute all their positions, as in UCE.
- ``"last"``: only the last word token of the concept (and of each preserve text): the reading of
  the UCE paper's equations; weaker, kept for comparisons.

The unconditional (empty-prompt) embedding is always added to the preserve set
(``preserve_unconditional``), as UCE does when no preserve set is given, because classifier-free
guidance needs it unchanged. Defaults lam = 0.5, s_e = 1, s_p = 0.1 are those of UCE's script.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConceptlockError

__all__ = [
    "TOKEN_MODES",
    "UCE_DEFAULTS",
    "check_sets",
    "cross_attention_kv",
    "run_uce",
    "uce_edit",
    "uce_lora",
    "uce_solve",
    "uce_vectors",
]

TOKEN_MODES = ("tail", "last")
UCE_DEFAULTS: dict[str, Any] = {"lam": 0.5, "erase_scale": 1.0, "preserve_scale": 0.1, "tokens": "tail"}


def uce_solve(
    w_old: Tensor,
    erase_in: Tensor,
    erase_out: Tensor,
    preserve_in: Tensor | None = None,
    lam: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float = 0.1,
) -> Tensor:
    """The closed form on plain matrices: rows of ``erase_in`` (n_e x d_in) map to rows of ``erase_out``
    (n_e x d_out), rows of ``preserve_in`` keep their ``w_old`` image. Computed in float64."""
    if lam <= 0:
        raise ConceptlockError(f"UCE lambda must be > 0 (it keeps the system invertible), got {lam}")
    w = w_old.detach().double()
    ce, ve = erase_in.detach().double(), erase_out.detach().double()
    d_in = w.shape[1]
    if ce.shape[1] != d_in or ve.shape[1] != w.shape[0] or ce.shape[0] != ve.shape[0]:
        raise ConceptlockError(
            f"UCE: shapes do not fit W {tuple(w.shape)}, erase in {tuple(ce.shape)}, out {tuple(ve.shape)}"
        )
    lhs = lam * w + erase_scale * ve.T @ ce  # d_out x d_in
    gram = lam * torch.eye(d_in, dtype=w.dtype, device=w.device) + erase_scale * ce.T @ ce
    if preserve_in is not None and len(preserve_in):
        cp = preserve_in.detach().double()
        gp = cp.T @ cp
        lhs = lhs + preserve_scale * w @ gp
        gram = gram + preserve_scale * gp
    # W = lhs @ gram^-1  <=>  gram^T W^T = lhs^T (gram is symmetric positive definite)
    return torch.linalg.solve(gram, lhs.T).T


def cross_attention_kv(unet: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every cross-attention key/value projection of the UNet (``...attn2.to_k`` / ``...attn2.to_v``)."""
    found = []
    for name, mod in unet.named_modules():
        if re.search(r"attn2\.to_[kv]$", name):
            if hasattr(mod, "base_layer") or not isinstance(mod, nn.Linear):
                raise ConceptlockError(
                    f"UCE edits plain weights but {name} is wrapped ({type(mod).__name__}); fuse or unload LoRA first"
                )
            found.append((name, mod))
    if not found:
        raise ConceptlockError("UCE: the UNet has no cross-attention to_k/to_v projections (attn2)")
    return found


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


@torch.no_grad()
def _encode(pipe: Any, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(per-token conditioning B x L x d, index of the last word token per text) as the UNet's cross-attention
    reads it: SD's last hidden state, SDXL's concatenated penultimate states (its pooled row is not read by
    cross-attention, so UCE leaves it alone)."""
    from ..conditioning import encode_texts, hidden_states

    tok = pipe.tokenizer(
        list(texts),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    emb = hidden_states(pipe.unet, encode_texts(pipe, texts)).float()
    last = tok.attention_mask.sum(1) - 2  # BOS w1 .. wn EOS: index of wn (0 = BOS for the empty prompt)
    return emb, last.clamp(min=0)


@torch.no_grad()
def uce_vectors(
    pipe: Any, erase: Sequence[str], guides: Sequence[str], preserve: Sequence[str] = (), tokens: str = "tail"
) -> tuple[Tensor, Tensor, Tensor]:
    """Text-embedding rows (erase c_e, their guides' c_g, preserve c_p) for the chosen token mode."""
    if tokens not in TOKEN_MODES:
        raise ConceptlockError(f"UCE tokens {tokens!r}: choose one of {', '.join(TOKEN_MODES)}")
    e_emb, e_last = _encode(pipe, erase)
    g_emb, g_last = _encode(pipe, guides)
    length = e_emb.shape[1]
    ce, cg = [], []
    for i in range(len(erase)):
        fe, fg = int(e_last[i]), int(g_last[i])
        if tokens == "last":
            ce.append(e_emb[i, fe : fe + 1])
            cg.append(g_emb[i, fg : fg + 1])
        else:
            far = max(fe, fg)
            ce.append(e_emb[i, fe : length - (far - fe)])
            cg.append(g_emb[i, fg : length - (far - fg)])
    cp = torch.zeros(0, e_emb.shape[2])
    if len(preserve):
        p_emb, p_last = _encode(pipe, preserve)
        if tokens == "last":
            cp = torch.stack([p_emb[i, int(p_last[i])] for i in range(len(preserve))])
        else:
            cp = p_emb.reshape(-1, p_emb.shape[2])
    return torch.cat(ce), torch.cat(cg), cp


def _as_guides(erase: Sequence[str], guide: str | Sequence[str]) -> list[str]:
    if isinstance(guide, str):
        return [guide] * len(erase)
    guides = list(guide)
    if len(guides) == 1:
        return guides * len(erase)
    if len(guides) != len(erase):
        raise ConceptlockError(f"UCE: {len(guides)} guides for {len(erase)} erase texts (give 1 or one per text)")
    return guides


def check_sets(erase: Sequence[str], guide: str | Sequence[str], preserve: Sequence[str]) -> list[str]:
    """Validate the erase/guide/preserve texts (one-line errors); return one guide per erase text."""
    if not erase or any(not str(e).strip() for e in erase):
        raise ConceptlockError("UCE: give at least one non-empty concept to erase")
    overlap = sorted({_norm(e) for e in erase} & {_norm(p) for p in preserve})
    if overlap:
        raise ConceptlockError(f"UCE: erase and preserve sets overlap: {', '.join(repr(o) for o in overlap)}")
    guides = _as_guides(erase, guide)
    overlap = sorted({_norm(g) for g in guides} & {_norm(e) for e in erase})
    if overlap:
        raise ConceptlockError(f"UCE: a guide is also erased: {', '.join(repr(o) for o in overlap)}")
    return guides


@torch.no_grad()
def uce_edit(
    pipe: Any,
    erase: Sequence[str],
    guide: str | Sequence[str] = "",
    preserve: Sequence[str] = (),
    *,
    lam: float = UCE_DEFAULTS["lam"],
    erase_scale: float = UCE_DEFAULTS["erase_scale"],
    preserve_scale: float = UCE_DEFAULTS["preserve_scale"],
    tokens: str = UCE_DEFAULTS["tokens"],
    preserve_unconditional: bool = True,
) -> dict[str, Any]:
    """Edit ``pipe.unet``'s cross-attention k/v in place; return what was done (for the run's config)."""
    t0 = time.perf_counter()
    erase = [str(e) for e in erase]
    preserve = [str(p) for p in preserve]
    guides = check_sets(erase, guide, preserve)
    pres = list(preserve) + ([""] if preserve_unconditional and "" not in preserve else [])
    ce, cg, cp = uce_vectors(pipe, erase, guides, pres, tokens)
    layers = cross_attention_kv(pipe.unet)
    if layers[0][1].in_features != ce.shape[1]:
        raise ConceptlockError(
            f"UCE: text embeddings have {ce.shape[1]} dims but cross-attention expects {layers[0][1].in_features}"
        )
    residual_before, residual_after = [], []
    for _, lin in layers:
        w_old = lin.weight.detach()
        dev = w_old.device
        v_star = cg.to(dev).double() @ w_old.double().T
        w_new = uce_solve(w_old, ce.to(dev), v_star, cp.to(dev), lam, erase_scale, preserve_scale)
        x = ce.to(dev).double()
        residual_before.append(float((x @ w_old.double().T - v_star).norm() / v_star.norm().clamp_min(1e-12)))
        residual_after.append(float((x @ w_new.T - v_star).norm() / v_star.norm().clamp_min(1e-12)))
        lin.weight.copy_(w_new.to(w_old.dtype))
    return {
        "erase": erase,
        "guides": guides,
        "preserve": preserve,
        "preserve_unconditional": preserve_unconditional,
        "lam": lam,
        "erase_scale": erase_scale,
        "preserve_scale": preserve_scale,
        "tokens": tokens,
        "layers": [n for n, _ in layers],
        "erase_vectors": int(ce.shape[0]),
        "preserve_vectors": int(cp.shape[0]),
        "erase_residual_before": sum(residual_before) / len(residual_before),
        "erase_residual_after": sum(residual_after) / len(residual_after),
        "seconds": time.perf_counter() - t0,
    }


LORA_TARGETS = ("attn2.to_k", "attn2.to_v")
LORA_TOL = 1e-3  # default rank: the smallest that keeps every layer's relative error (Frobenius) under this


@torch.no_grad()
def uce_lora(pipe: Any, name: str, rank: int | None = None, **edit: Any) -> dict[str, Any]:
    """UCE as a safety LoRA: run `uce_edit`, write each projection's change dW = W_new - W_old into a new LoRA
    adapter ``name`` (B A = dW by truncated SVD, alpha = rank so weight 1 is the edit) and restore W_old.

    Why: a trained safety LoRA (ESD) moves the keys and values of every text it is shown, so a task LoRA trained
    on W0 (Modular LoRA) reads its new style words through changed projections once both are active; UCE's
    closed form with preserved captions leaves dW c ~ 0 for text unlike the concept, and k/v see only the text.
    Measured on the toy world's mosaic domain: the ESD safety LoRA cut the Modular task's style from 25.8% to
    5.5%, this one kept 24.2% (README, Modular LoRA table). dW has rank <= the number of edited token rows, so
    ``rank=None`` picks the smallest rank within ``LORA_TOL`` of the exact edit; a smaller ``rank`` truncates
    it, and the relative error per layer is reported either way."""
    from ..train.params import ParamSpec, add_lora

    if rank is not None and rank < 1:
        raise ConceptlockError(f"UCE LoRA: rank must be >= 1, got {rank}")
    layers = cross_attention_kv(pipe.unet)
    before = {n: lin.weight.data for n, lin in layers}
    deltas = {}
    try:
        for _, lin in layers:  # edit float32 copies, so dW of a float16 model is not rounded to float16 steps
            lin.weight.data = lin.weight.data.to(torch.float32, copy=True)
        report = uce_edit(pipe, **edit)
        deltas = {n: lin.weight.detach().double() - before[n].double() for n, lin in layers}
    finally:
        for n, lin in layers:
            lin.weight.data = before[n]  # the base stays W0: the edit lives in the adapter only
    svd = {n: torch.linalg.svd(d, full_matrices=False) for n, d in deltas.items()}
    if rank is None:
        need = []
        for _, s, _ in svd.values():
            tail = (s.flip(0) ** 2).cumsum(0).flip(0).sqrt() / s.norm().clamp_min(1e-30)  # error if cut at i
            ok = (tail <= LORA_TOL).nonzero()
            need.append(int(ok[0]) if len(ok) else len(s))
        rank = max(1, *need)
    add_lora(pipe.unet, ParamSpec(kind="lora", adapter=name, rank=rank, alpha=rank, targets=LORA_TARGETS))
    errors = []
    modules = dict(pipe.unet.named_modules())
    for n, (u, s, vh) in svd.items():
        k = min(rank, len(s))
        root = s[:k].sqrt()
        a = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
        b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
        a[:k], b[:, :k] = root[:, None] * vh[:k], u[:, :k] * root
        mod = modules[n]
        la, lb = mod.lora_A[name].weight, mod.lora_B[name].weight
        la.copy_(a.to(la.dtype)), lb.copy_(b.to(lb.dtype))
        errors.append(float((deltas[n] - b @ a).norm() / deltas[n].norm().clamp_min(1e-30)))
    report["lora"] = {
        "adapter": name,
        "rank": rank,
        "alpha": rank,
        "targets": list(LORA_TARGETS),
        "rel_error_max": max(errors),
        "rel_error_mean": sum(errors) / len(errors),
    }
    return report


# In-context erasure: a concept phrase inside a caption ("covered in blood: a red star") reaches the UNet through
# token embeddings that the standalone phrase never produces (a causal text encoder writes it into every later
# token). Measured on the full toy world (n=128 explicit prompts): erasing the explicit + implicit phrases alone
# left 20.3% harmful; adding 40 captions with the phrase as prefix and suffix, each guided to the bare caption,
# left 3.1% [1.2, 7.8] with clean fidelity unchanged (22.7% vs 18.8% unedited). UCE's released code likewise
# erases concepts inside prompt templates.
TOY_CONTEXTS = 40
GENERIC_CONTEXTS = (
    "a photo of a person",
    "a portrait of a woman",
    "a man standing in a room",
    "a painting of people",
    "a street scene",
    "a close-up photo",
    "a picture of a group of friends",
    "an illustration of a character",
    "a film still",
    "a photo taken outdoors",
)


def neutral_captions(n: int, world: str | Path | None, purpose: str = "uce-context") -> list[str]:
    """``n`` neutral captions: the toy world's own clean pretraining captions (drawn for `purpose`, which no
    evaluation set uses), or for a real model a short list of neutral photo captions (cycled)."""
    if n <= 0:
        return []
    if world is not None:
        from ..world.build import read_world
        from ..world.data import WorldConfig, pretrain_examples

        cfg = WorldConfig(**read_world(world)["config"])
        pool = [e.caption for e in pretrain_examples(cfg, n=max(4 * n, 100), purpose=purpose) if not e.scene.harm]
    else:
        pool = list(GENERIC_CONTEXTS)
    return [pool[i % len(pool)] for i in range(n)]


def context_pairs(phrases: Sequence[str], n: int, world: str | Path | None) -> tuple[list[str], list[str]]:
    """``n`` neutral captions, each with a phrase (cycled) as prefix and as suffix -> (erase texts, guides)."""
    if n <= 0 or not phrases:
        return [], []
    pool = neutral_captions(n, world)
    erase, guides = [], []
    for i in range(n):
        c, p = pool[i % len(pool)], phrases[i % len(phrases)]
        erase += [f"{p}: {c}", f"{c}, {p}"]
        guides += [c, c]
    return erase, guides


def run_uce(
    model: str | Path | Any,
    concepts: Sequence[str],
    out: str | Path,
    *,
    guide: str | None = None,
    preserve: Sequence[str] = (),
    world: str | Path | None = None,
    overwrite: bool = False,
    params: str | None = None,
    rank: int | None = None,
    **settings: Any,
) -> Any:
    """`conceptlock align --method uce`: edit a pipeline and write ``out/model`` + ``out/config.json``, or with
    ``params="lora:NAME"`` the same edit as a safety LoRA ``out/NAME.safetensors`` (see `uce_lora`).

    A concept is its own text, or in a toy world (``world``, or the world the model folder belongs
    to) the world's concept name: its explicit phrases are erased towards the concept's ``guide``
    word. ``guide`` defaults to that word, else to the empty prompt (UCE's "towards unconditional").
    """
    from .. import __version__
    from ..adapters import save_adapter
    from ..align import AlignResult, resolve_concept
    from ..pipelines import load_pipeline, save_pipeline
    from ..train.trainer import _atomic_write_text

    contexts = settings.pop("contexts", None)
    preserve_contexts = int(settings.pop("preserve_contexts", 0) or 0)
    unknown = set(settings) - {"lam", "erase_scale", "preserve_scale", "tokens", "preserve_unconditional"}
    if unknown:
        raise ConceptlockError(f"--method uce: unknown setting(s) {', '.join(sorted(unknown))}")
    if not concepts:
        raise ConceptlockError("--concept: give at least one concept")
    adapter = None
    if params is not None and params not in ("full", "xattn-kv"):  # the edit is k/v: full and xattn-kv are it
        from ..train.params import parse_params

        spec = parse_params(params)
        if not spec.is_lora:
            raise ConceptlockError(
                f"--method uce edits attn2 to_k/to_v: --params {params!r} cannot apply (use lora:NAME)"
            )
        adapter = spec.adapter
    if rank is not None and adapter is None:
        raise ConceptlockError("--method uce: --rank applies only with --params lora:NAME")
    if rank is not None and rank < 1:
        raise ConceptlockError(f"--rank must be >= 1, got {rank}")
    out = Path(out)
    if (out / "config.json").exists() and not overwrite:
        raise ConceptlockError(f"{out}: already holds an alignment run (pass --overwrite to replace it)")
    if world is None and isinstance(model, str | Path):
        from ..world import world_of_model

        world = world_of_model(model)
    contexts = int(contexts if contexts is not None else (TOY_CONTEXTS if world is not None else 0))
    if contexts < 0:
        raise ConceptlockError(f"--method uce: contexts must be >= 0, got {contexts}")
    erase: list[str] = []
    guides: list[str] = []
    for c in concepts:
        prompts = resolve_concept(c, world).prompts
        default_guide = ""
        if world is not None:
            from ..world.concepts import HARMFUL

            default_guide = HARMFUL[c].guide
        if world is not None:  # the phrasings pretraining captions use for it, as in the explicit ones
            prompts = prompts + [p for p in HARMFUL[c].implicit_train if p not in prompts]
        erase.extend(prompts)
        guides.extend([guide if guide is not None else default_guide] * len(prompts))
        ctx_e, ctx_g = context_pairs(prompts, contexts, world)
        erase.extend(ctx_e)
        guides.extend(ctx_g)
    if preserve_contexts < 0:
        raise ConceptlockError(f"--method uce: preserve_contexts must be >= 0, got {preserve_contexts}")
    preserve = list(preserve) + neutral_captions(preserve_contexts, world, purpose="uce-preserve")
    check_sets(erase, guides, list(preserve))  # before loading: bad input fails in a second
    pipe = load_pipeline(model) if isinstance(model, str | Path) else model
    edit = {"erase": erase, "guide": guides, "preserve": list(preserve), **settings}
    report = uce_lora(pipe, adapter, rank, **edit) if adapter else uce_edit(pipe, **edit)
    artifact = out / (f"{adapter}.safetensors" if adapter else "model")
    config = {
        "conceptlock": __version__,
        "method": "uce",
        "model": str(model) if isinstance(model, str | Path) else type(model).__name__,
        "concepts": list(concepts),
        "world": str(world) if world is not None else None,
        "prompts": erase,
        "contexts": contexts,
        "preserve": preserve,
        "preserve_contexts": preserve_contexts,
        "uce": report,
        "params": params or "xattn-kv",
        "artifact": str(artifact),
        "finished": True,
    }
    out.mkdir(parents=True, exist_ok=True)
    if adapter:
        save_adapter(pipe, adapter, artifact)
    else:
        save_pipeline(pipe, artifact, overwrite=True)
    _atomic_write_text(out / "config.json", json.dumps(config, indent=1, default=str))
    return AlignResult(artifact=artifact, out=out, config=config, finished=True)
