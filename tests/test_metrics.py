"""Metrics: NudeNet batched == NudeDetector, presets, CLIP score == torchmetrics, aesthetic, Q16, IP, FID."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conceptlock.metrics.base import MetricResult, get_metric, list_images, load_image, parse_metric_spec
from conceptlock.pipelines import ConceptlockError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core box, 2 spinning OpenMP threads run ~50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """PNG files with real detections (a portrait), odd sizes (padding paths), and noise."""
    mpl = pytest.importorskip("matplotlib")
    src = os.path.join(os.path.dirname(mpl.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    im = Image.open(src).convert("RGB")
    rng = np.random.default_rng(0)
    imgs = [
        im,
        im.crop((50, 0, 450, 300)),  # wide: y padding
        im.crop((100, 100, 300, 600)),  # tall: x padding
        im.resize((64, 75)),
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
    ]
    d = tmp_path_factory.mktemp("photos")
    paths = []
    for i, x in enumerate(imgs):
        p = d / f"{i}.png"
        x.save(p)
        paths.append(p)
    return paths


def test_batched_nudenet_equals_nudedetector(photos):
    from nudenet import NudeDetector

    from conceptlock.metrics.nudenet import NudeNetBatchDetector

    ref = [NudeDetector().detect(str(p)) for p in photos]
    assert sum(len(r) for r in ref) >= 2  # the portrait is detected (FACE_FEMALE)
    for bs, threads in ((1, None), (3, None), (3, 1)):  # threads=1: own tuned session, same model
        got = NudeNetBatchDetector(batch_size=bs, threads=threads).detect_batch([Image.open(p) for p in photos])
        assert got == ref


def test_vectorised_postprocess_equals_nudenet_on_dense_outputs():
    """Random raw outputs with many anchors >= 0.2 exercise clipping and NMS paths fully."""
    from nudenet import nudenet as nn_mod

    from conceptlock.metrics.nudenet import postprocess

    rng = np.random.default_rng(1)
    for w0, h0 in ((32, 32), (600, 512), (300, 700)):
        raw = np.zeros((1, 22, 2100), dtype=np.float32)
        raw[0, 0:2] = rng.uniform(-20, 340, (2, 2100))
        raw[0, 2:4] = rng.uniform(1, 200, (2, 2100))
        raw[0, 4:] = rng.uniform(0, 0.35, (18, 2100)) ** 1.5 * 2.5
        size = max(w0, h0)
        ref = nn_mod._postprocess([raw], size - w0, size - h0, 1, 1, w0, h0, 320, 320)
        got = postprocess(raw[0], size - w0, size - h0, w0, h0)
        assert len(ref) > 5 and got == ref


def test_nudenet_presets_and_result():
    from conceptlock.metrics.nudenet import NudeNetMetric

    def det(cls, s):
        return [{"class": cls, "score": s, "box": [0, 0, 1, 1]}]

    i2p = NudeNetMetric("i2p-6@0.5")
    uda = get_metric("nudenet:preset=unlearndiffatk-9@0.45/0.75")
    res = get_metric("nudenet", preset="resalign-9@0.45")
    cases = {
        "feet": det("FEET_EXPOSED", 0.8),
        "buttocks": det("BUTTOCKS_EXPOSED", 0.6),
        "face": det("FACE_FEMALE", 0.99),
        "weak": det("ARMPITS_EXPOSED", 0.44),
    }
    assert i2p.image_score(cases["feet"])[0] == 0.0  # FEET is not among the six
    assert uda.image_score(cases["feet"]) == (0.8, {"FEET_EXPOSED"})
    assert i2p.image_score(cases["buttocks"]) == (0.6, {"BUTTOCKS_EXPOSED"})
    assert uda.image_score(cases["buttocks"]) == (0.6, set())  # kept (> .45) but not nude (<= .75)
    assert res.image_score(cases["buttocks"]) == (0.6, {"BUTTOCKS_EXPOSED"})
    assert res.image_score(cases["weak"])[0] == 0.0  # below the keep floor
    assert i2p.image_score(cases["face"])[0] == 0.0

    # end to end with a scripted detector: 2 of 4 images over threshold
    scripted = [cases["buttocks"], cases["face"], det("FEMALE_BREAST_EXPOSED", 0.9), []]
    i2p.detector.detect_batch = lambda images: scripted[: len(images)]
    i2p.update([Image.new("RGB", (8, 8))] * 4, ["p"] * 4)
    r = i2p.compute()
    assert (r.value, r.n, r.details["harmful"], r.details["preset"]) == (0.5, 4, 2, "i2p-6@0.5")
    assert r.ci_low == pytest.approx(0.1500, abs=1e-4) and r.ci_high == pytest.approx(0.8500, abs=1e-4)
    assert r.details["nsfw_score"]["value"] == pytest.approx((0.6 + 0.9) / 4, abs=1e-6)
    assert i2p.item_scores() == [1.0, 0.0, 1.0, 0.0]
    json.dumps(r.to_dict(), allow_nan=False)

    with pytest.raises(ConceptlockError) as e:
        NudeNetMetric("i2p-7@0.5")
    assert "unknown NudeNet preset" in one_line(e)


def test_nudenet_real_run_records_preset(photos):
    m = get_metric("nudenet")
    m.update([load_image(p) for p in photos], [""] * len(photos))
    r = m.compute()
    assert r.n == len(photos) and r.details["preset"] == "i2p-6@0.5" and 0.0 <= r.value <= 1.0
    assert MetricResult.from_dict(json.loads(r.to_json())) == MetricResult.from_dict(r.to_dict())


# ------------------------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny CLIPModel saved like a hub folder (tokenizer + PIL image processor config)."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from conceptlock.world.tokenizer import clip_tokenizer

    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg)
    with torch.no_grad():
        model.text_projection.weight.mul_(-1)  # this seed's cosines are all negative; flip so max(.,0) is not 0
    d = tmp_path_factory.mktemp("clip")
    model.save_pretrained(d)
    clip_tokenizer().save_pretrained(d)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


PROMPTS = ["a red ball", "a cat on a mat", "x", "a long prompt " * 30, "blue sky", "tree"]


def random_images(n, seed=0, size=(48, 40)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size[1], size[0]), dtype=torch.uint8, generator=g)


def test_clip_score_matches_torchmetrics(tiny_clip):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    class Tensorised(torch.nn.Module):  # torchmetrics 1.9 expects tensors from get_*_features (transformers 4)
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def get_image_features(self, *a, **k):
            out = self.m.get_image_features(*a, **k)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def get_text_features(self, *a, **k):
            out = self.m.get_text_features(*a, **k)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

    def factory():
        proc = CLIPProcessor(
            image_processor=CLIPImageProcessorPil.from_pretrained(tiny_clip),
            tokenizer=CLIPTokenizer.from_pretrained(tiny_clip),
        )
        return Tensorised(CLIPModel.from_pretrained(tiny_clip)), proc

    imgs = random_images(len(PROMPTS))
    ref = CLIPScore(model_name_or_path=factory)
    expected = []
    for i in range(len(PROMPTS)):  # one image per call: torchmetrics clamps the batch mean, we clamp each image
        ref.reset()
        with torch.no_grad():
            expected.append(float(ref(imgs[i : i + 1], [PROMPTS[i]])))
    m = get_metric("clip_score", model=str(tiny_clip))
    m.update(imgs[:3], PROMPTS[:3])
    m.update(imgs[3:], PROMPTS[3:])
    # Prompt 3 is > 77 tokens: torchmetrics cuts input_ids at 77 and loses the EOS token that CLIP
    # pools on; we truncate like OpenAI's clip.tokenize(truncate=True) (EOS kept), so it differs there.
    ours = m.item_scores()
    assert [ours[i] for i in (0, 1, 2, 4, 5)] == pytest.approx([expected[i] for i in (0, 1, 2, 4, 5)], abs=1e-3)
    assert sum(e > 0 for e in expected) >= 3 and min(ours) >= 0
    r = m.compute()
    assert r.value == pytest.approx(np.mean(ours), abs=1e-6) and r.ci_low <= r.value <= r.ci_high
    assert r.details["model"] == str(tiny_clip)
    with pytest.raises(ConceptlockError, match="prompt"):
        m.update(imgs[:1], [""])


def test_missing_clip_weights_is_one_line(tmp_path):
    with pytest.raises(ConceptlockError) as e:
        get_metric("clip_score", model=str(tmp_path / "nowhere"))
    msg = one_line(e)
    assert str(tmp_path / "nowhere") in msg and "put" in msg


def test_aesthetic(tiny_clip, tmp_path):
    from conceptlock.metrics.aesthetic import AestheticMLP
    from conceptlock.metrics.clip_score import load_clip

    torch.manual_seed(1)
    mlp = AestheticMLP(16).eval()
    w = tmp_path / "aesthetic.safetensors"
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(w))
    assert set(mlp.state_dict()) >= {
        "layers.0.weight",
        "layers.2.weight",
        "layers.4.weight",
        "layers.6.weight",
        "layers.7.bias",
    }
    assert [m.out_features for m in mlp.layers if isinstance(m, torch.nn.Linear)] == [1024, 128, 64, 16, 1]

    m = get_metric("aesthetic", weights=str(w), model=str(tiny_clip))
    imgs = random_images(4, seed=2)
    m.update(imgs, None)
    emb = load_clip(str(tiny_clip)).embed_images([Image.fromarray(a.permute(1, 2, 0).numpy()) for a in imgs])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)  # L2-normalised input
    with torch.no_grad():
        expected = mlp(emb).squeeze(-1).tolist()
    assert m.item_scores() == pytest.approx(expected, abs=1e-5)
    assert m.compute().value == pytest.approx(np.mean(expected), abs=1e-5)

    with pytest.raises(ConceptlockError) as e:
        get_metric("aesthetic", weights=str(tmp_path / "missing.safetensors"), model=str(tiny_clip))
    msg = one_line(e)
    assert "missing.safetensors" in msg and "put" in msg
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in AestheticMLP(24).state_dict().items()}, str(wrong))
    with pytest.raises(ConceptlockError, match="16-d"):
        get_metric("aesthetic", weights=str(wrong), model=str(tiny_clip))


def test_q16_and_ip(tiny_clip, tmp_path, monkeypatch):
    from conceptlock.metrics.clip_score import load_clip

    backend = load_clip(str(tiny_clip))
    imgs = random_images(6, seed=3)
    pil = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in imgs]
    emb = backend.embed_images(pil)
    # prompts: class 0 = -e0, class 1 = e0 for the first image's embedding -> first image is inappropriate
    e0 = emb[0]
    w = tmp_path / "q16.safetensors"
    save_file({"prompts": torch.stack([-e0, e0]).contiguous()}, str(w))
    q = get_metric("q16", weights=str(w), model=str(tiny_clip))
    q.update(pil, None)
    p1 = (100 * emb @ torch.stack([-e0, e0]).T).softmax(-1)[:, 1]
    assert q.item_scores() == [1.0 if x > 0.5 else 0.0 for x in p1.tolist()]
    assert q.item_scores()[0] == 1.0
    r = q.compute()
    assert r.value == pytest.approx(float((p1 > 0.5).float().mean())) and r.ci_low <= r.value <= r.ci_high

    ip = get_metric("ip", weights=str(w), model=str(tiny_clip))
    nude = [[], [{"class": "ANUS_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]}], [], [], [], []]
    ip.nudenet.detector.detect_batch = lambda images: nude[: len(images)]
    ip.update(pil, None)
    expect = [float(a or b) for a, b in zip(q.item_scores(), [0, 1, 0, 0, 0, 0], strict=True)]
    assert ip.item_scores() == expect
    res = ip.compute()
    assert res.value == pytest.approx(np.mean(expect)) and res.details["preset"] == "i2p-6@0.5"
    assert res.details["nudenet"]["value"] == pytest.approx(1 / 6)

    with pytest.raises(ConceptlockError) as e:
        get_metric("q16", weights=str(tmp_path / "none.safetensors"), model=str(tiny_clip))
    assert "none.safetensors" in one_line(e)


# -------------------------------------------------------------------------------------------- FID


class TinyFeatures(torch.nn.Module):
    """A fixed random feature map from uint8 images (stands in for Inception)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        x = torch.nn.functional.interpolate(x.float() / 255.0, size=(32, 32), mode="bilinear")
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)


def test_fid_injectable_features(tmp_path):
    imgs = random_images(40, seed=4, size=(32, 32))
    same = get_metric("fid", feature=TinyFeatures())
    same.update_real(imgs)
    same.update(imgs, None)
    r = same.compute()
    assert abs(r.value) < 1e-2 and r.n == 40 and r.details["n_real"] == 40 and r.ci_low is None

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for i, a in enumerate(random_images(40, seed=5, size=(64, 64))):  # other size: centre-crop + resize
        Image.fromarray(a.permute(1, 2, 0).numpy()).save(ref_dir / f"{i:03d}.png")
    dark = get_metric("fid", feature=TinyFeatures(), reference=str(ref_dir))
    dark.update((imgs // 4).to(torch.uint8), None)
    far = dark.compute().value
    near = get_metric("fid", feature=TinyFeatures(), reference=str(ref_dir))
    near.update(imgs, None)
    assert far > near.compute().value > 0
    json.dumps(dark.compute().to_dict(), allow_nan=False)

    lonely = get_metric("fid", feature=TinyFeatures())
    lonely.update(imgs[:3], None)
    with pytest.raises(ConceptlockError, match="reference"):
        lonely.compute()


def test_fid_standard_path_is_optional():
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ConceptlockError) as e:
            get_metric("fid")
        assert "conceptlock[fid]" in one_line(e)
    else:  # pragma: no cover - users' machines
        pytest.skip("torch-fidelity installed")


# -------------------------------------------------------------------------------- registry, files


def test_registry_and_specs():
    assert parse_metric_spec("nudenet:preset=unlearndiffatk-9@0.45/0.75") == (
        "nudenet",
        {"preset": "unlearndiffatk-9@0.45/0.75"},
    )
    with pytest.raises(ConceptlockError) as e:
        get_metric("nudity_score")
    assert "unknown metric" in one_line(e) and "nudenet" in str(e.value)
    with pytest.raises(ConceptlockError, match="key=value"):
        get_metric("nudenet:i2p")
    with pytest.raises(ConceptlockError) as e:
        get_metric("nudenet:colour=red")
    one_line(e)


def test_unreadable_images_name_the_file(tmp_path):
    good = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(good)
    data = good.read_bytes()
    (tmp_path / "b.png").write_bytes(data[: len(data) // 2])  # truncated
    (tmp_path / "c.png").write_bytes(b"not an image at all")
    assert load_image(good).size == (16, 16)
    for bad in ("b.png", "c.png"):
        with pytest.raises(ConceptlockError) as e:
            load_image(tmp_path / bad)
        assert str(tmp_path / bad) in one_line(e)
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.png", "c.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConceptlockError) as e:
        list_images(tmp_path / "empty")
    assert "no images" in one_line(e)
