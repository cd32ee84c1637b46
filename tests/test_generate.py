"""Generation engine: determinism, per-row guidance, resume, sharding (bit-identical), K images."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conceptlock.generate import generate, image_seed, plan_batches, read_manifest
from conceptlock.pipelines import ConceptlockError, tiny_pipeline
from conceptlock.prompts import PromptRow

STEPS = 2


class CountingPipe:
    """Wraps a pipeline: counts calls and records their guidance and batch sizes."""

    def __init__(self, pipe):
        self._pipe = pipe
        self.calls = []

    def __call__(self, **kw):
        self.calls.append({"guidance": kw["guidance_scale"], "n": len(kw["prompt"])})
        return self._pipe(**kw)

    def __getattr__(self, name):
        return getattr(self._pipe, name)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core box, 2 spinning OpenMP threads run ~50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_rows(n=5, guidance=None):
    return [
        PromptRow(f"a photo of object {i}", seed=1000 + 17 * i, index=i, guidance=guidance, extra={"shape": f"s{i}"})
        for i in range(n)
    ]


def files(d):
    return {p.name: p.read_bytes() for p in sorted((Path(d) / "images").glob("*.png"))}


def test_deterministic_and_manifest(pipe, tmp_path):
    rows = make_rows(5)
    a = generate(pipe, rows, tmp_path / "a", steps=STEPS, batch_size=2, progress=False, model="tiny")
    generate(pipe, rows, tmp_path / "b", steps=STEPS, batch_size=2, progress=False, model="tiny")
    fa, fb = files(tmp_path / "a"), files(tmp_path / "b")
    assert len(fa) == 5 and fa == fb  # same rows + seeds -> same bytes
    assert len(set(fa.values())) == 5  # different prompts/seeds -> different images
    assert a.complete and a.generated == 5 and a.pipe_calls == 3
    lines = (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()
    e = json.loads(lines[1])
    assert e["image"] == "images/00001_00.png" and e["seed"] == 1017 and e["row_seed"] == 1017
    assert (e["steps"], e["guidance"], e["model"], e["row"]) == (STEPS, 7.5, "tiny", {"shape": "s1"})
    assert {"prompt", "height", "width", "adapters", "options", "key"} <= set(e)
    assert not list((tmp_path / "a").glob("manifest.part-*")) and not list((tmp_path / "a").rglob(".*tmp*"))
    # a row's image depends on its seed: reseeding one row changes only that image
    rows2 = list(rows)
    rows2[2] = PromptRow(rows[2].prompt, seed=5, index=2, extra=rows[2].extra)
    generate(pipe, rows2, tmp_path / "c", steps=STEPS, batch_size=2, progress=False, model="tiny")
    fc = files(tmp_path / "c")
    assert fc["00002_00.png"] != fa["00002_00.png"] and fc["00000_00.png"] == fa["00000_00.png"]


def test_row_guidance_splits_batches(pipe, tmp_path):
    rows = make_rows(4)
    rows[1] = PromptRow(rows[1].prompt, seed=rows[1].seed, index=1, guidance=3.0)
    rows[3] = PromptRow(rows[3].prompt, seed=rows[3].seed, index=3, guidance=3.0)
    cp = CountingPipe(pipe)
    generate(cp, rows, tmp_path, steps=STEPS, batch_size=4, progress=False)
    assert sorted((c["guidance"], c["n"]) for c in cp.calls) == [(3.0, 2), (7.5, 2)]
    man = read_manifest(tmp_path)
    assert man["images/00001_00.png"]["guidance"] == 3.0 and man["images/00000_00.png"]["guidance"] == 7.5


def test_resume_skips_existing_and_regenerates_missing(pipe, tmp_path):
    rows = make_rows(4)
    cp = CountingPipe(pipe)
    generate(cp, rows, tmp_path, steps=STEPS, batch_size=2, progress=False)
    assert len(cp.calls) == 2
    before = files(tmp_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "images").iterdir()}

    cp.calls.clear()
    r = generate(cp, rows, tmp_path, steps=STEPS, batch_size=2, progress=False)
    assert len(cp.calls) == 0 and r.skipped == 4 and r.generated == 0 and r.complete

    (tmp_path / "images" / "00003_00.png").unlink()
    r = generate(cp, rows, tmp_path, steps=STEPS, batch_size=2, progress=False)
    assert len(cp.calls) == 1 and r.generated == 1 and r.skipped == 3
    assert files(tmp_path) == before  # regenerated image is bit-identical
    assert (tmp_path / "images" / "00002_00.png").stat().st_mtime_ns == mtimes["00002_00.png"]  # not rewritten

    # an image on disk without a matching manifest entry (different settings) is not trusted
    cp.calls.clear()
    r = generate(cp, rows, tmp_path, steps=STEPS + 1, batch_size=2, progress=False)
    assert len(cp.calls) == 2 and r.generated == 4
    assert read_manifest(tmp_path)["images/00000_00.png"]["steps"] == STEPS + 1


def test_options_are_recorded_and_keyed_and_torn_lines_tolerated(pipe, tmp_path):
    rows = make_rows(2)
    cp = CountingPipe(pipe)
    generate(cp, rows, tmp_path, steps=STEPS, batch_size=2, progress=False)
    plain = files(tmp_path)
    r = generate(cp, rows, tmp_path, steps=STEPS, batch_size=2, progress=False, options={"negative_prompt": "blurry"})
    assert r.generated == 2 and len(cp.calls) == 2  # different options: the old images do not match
    assert read_manifest(tmp_path)["images/00000_00.png"]["options"] == {"negative_prompt": "blurry"}
    assert files(tmp_path) != plain
    # a crash mid-append leaves a torn line in a part file: it is ignored and that image redone
    (tmp_path / "manifest.part-000of002.jsonl").write_text('{"image": "images/00001_00.png", "ke')
    (tmp_path / "images" / "00001_00.png").unlink()
    r = generate(cp, rows, tmp_path, steps=STEPS, batch_size=2, progress=False, options={"negative_prompt": "blurry"})
    assert r.complete and r.generated == 1
    (tmp_path / "manifest.jsonl").write_text("not json\n")
    with pytest.raises(ConceptlockError, match="manifest.jsonl: line 1"):
        read_manifest(tmp_path)


def test_images_per_prompt(pipe, tmp_path):
    rows = make_rows(2)
    r = generate(pipe, rows, tmp_path, steps=STEPS, images_per_prompt=3, batch_size=4, progress=False)
    f = files(tmp_path)
    assert sorted(f) == [f"0000{i}_0{k}.png" for i in range(2) for k in range(3)]
    seeds = [e["seed"] for e in r.entries]
    assert seeds[0] == rows[0].seed and seeds[1] == image_seed(rows[0].seed, 1) and len(set(seeds)) == 6
    assert len(set(f.values())) == 6
    assert image_seed(5, 1) != image_seed(6, 0) and 0 <= image_seed(2**63 - 1, 7) < 2**63


def test_explicit_shards_equal_single_process(pipe, tmp_path):
    rows = make_rows(5)
    kw = dict(steps=STEPS, batch_size=2, images_per_prompt=2, progress=False)
    generate(pipe, rows, tmp_path / "one", **kw)
    s0 = generate(pipe, rows, tmp_path / "two", shard=(0, 2), **kw)
    assert not s0.complete and s0.generated == 6  # 5 batches of 2 -> shard 0 has 3
    s1 = generate(pipe, rows, tmp_path / "two", shard=(1, 2), **kw)
    assert s1.complete and s1.generated == 4 and len(s1.entries) == 10
    assert files(tmp_path / "one") == files(tmp_path / "two")
    man_one = read_manifest(tmp_path / "one")
    assert read_manifest(tmp_path / "two") == man_one


def test_bad_inputs(pipe, tmp_path):
    with pytest.raises(ConceptlockError, match="empty prompt set"):
        generate(pipe, [], tmp_path)
    with pytest.raises(ConceptlockError, match="images-per-prompt"):
        plan_batches(make_rows(1), steps=1, guidance=7.5, images_per_prompt=0, batch_size=1, height=32, width=32)
    dup = [PromptRow("a", seed=1, index=0), PromptRow("b", seed=2, index=0)]
    with pytest.raises(ConceptlockError, match="duplicate row index"):
        generate(pipe, dup, tmp_path, steps=STEPS, progress=False)
    with pytest.raises(ConceptlockError, match="shard"):
        generate(pipe, make_rows(1), tmp_path, steps=STEPS, shard=(2, 2), progress=False)


SCRIPT = textwrap.dedent(
    """
    import sys
    from conceptlock.generate import generate
    from conceptlock.pipelines import tiny_pipeline
    from conceptlock.prompts import PromptRow
    rows = [PromptRow(f"a photo of object {i}", seed=1000 + 17 * i, index=i) for i in range(5)]
    r = generate(tiny_pipeline(0), rows, sys.argv[1], steps=2, batch_size=2, progress=False)
    with open(f"{sys.argv[1]}.shard{r.shard[0]}", "w") as f:  # not stdout: two processes interleave there
        f.write(f"{r.shard[0]} {r.shard[1]} {r.generated} {r.complete}")
    """
)


def test_two_process_launch_is_bit_identical(pipe, tmp_path):
    """Real multi-process run through accelerate's PartialState (torchrun launcher, gloo on CPU)."""
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["--master_addr", "127.0.0.1", str(script), str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shards = sorted(p.read_text().split() for p in tmp_path.glob("two.shard*"))
    assert shards == [["0", "2", "4", "True"], ["1", "2", "1", "True"]]  # 3 batches split 2 + 1
    rows = [PromptRow(f"a photo of object {i}", seed=1000 + 17 * i, index=i) for i in range(5)]
    generate(pipe, rows, tmp_path / "one", steps=STEPS, batch_size=2, progress=False)
    assert files(tmp_path / "one") == files(tmp_path / "two")
    assert (tmp_path / "one" / "manifest.jsonl").read_bytes() == (tmp_path / "two" / "manifest.jsonl").read_bytes()
    assert not list((tmp_path / "two").glob("manifest.part-*"))
