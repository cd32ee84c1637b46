"""NudeNet throughput: conceptlock's batched metric vs a raw onnxruntime loop vs one NudeDetector per image.

    python benchmarks/bench_nudenet.py [--images 32] [--batch-size 8] [--threads 1] [--repeats 3]

- "conceptlock": ``NudeNetMetric.update`` (preprocess, batched session.run, NMS, preset scoring).
- "raw onnxruntime": the *same* session fed pre-made input blobs in batches of the same size; the
  floor for any exact NudeNet implementation (goal: conceptlock >= 0.9x its throughput).
- "NudeDetector per image": what the reference scripts do, ``NudeDetector().detect(img)`` with a new
  detector (ONNX session) per image (goal: >= 5x slower than conceptlock).

Timings interleave the methods and report the best of ``--repeats`` (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from PIL import Image


def make_images(n: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = []
    try:
        import matplotlib

        src = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
        photo = Image.open(src).convert("RGB")
    except Exception:  # pragma: no cover
        photo = None
    for i in range(n):
        if photo is not None and i % 2 == 0:
            x0 = int(rng.integers(0, 200))
            out.append(photo.crop((x0, 0, x0 + 300, 300)).resize((size, size)))
        else:
            out.append(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (generated images)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads for ours and raw (0 = ORT default)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from nudenet import NudeDetector

    from conceptlock.metrics.nudenet import NudeNetMetric, preprocess_bgr

    images = make_images(args.images, args.size)
    bgr = [np.ascontiguousarray(np.asarray(im)[:, :, ::-1]) for im in images]
    metric = NudeNetMetric(batch_size=args.batch_size, threads=args.threads or None)
    session, name = metric.detector.session, metric.detector.input_name
    blobs = [
        np.concatenate([preprocess_bgr(m)[0] for m in bgr[i : i + args.batch_size]])
        for i in range(0, len(bgr), args.batch_size)
    ]
    session.run(None, {name: blobs[0]})  # warm-up both paths once
    NudeDetector().detect(bgr[0])

    def ours() -> None:
        metric.reset()
        metric.update(images)

    def raw() -> None:
        for b in blobs:
            session.run(None, {name: b})

    def per_image() -> None:
        for m in bgr:
            NudeDetector().detect(m)

    methods = {"conceptlock NudeNetMetric": ours, "raw onnxruntime loop": raw, "NudeDetector per image": per_image}
    best = {k: float("inf") for k in methods}
    for _ in range(args.repeats):
        for k, fn in methods.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)

    n = len(images)
    ours_ips = n / best["conceptlock NudeNetMetric"]
    print(
        f"NudeNet 320n, {n} images of {args.size}px, batch {args.batch_size}, "
        f"threads {args.threads or 'ORT default'}, best of {args.repeats}"
    )
    print(f"| {'method':28s} | {'s/img':>8s} | {'img/s':>8s} | {'vs conceptlock':>14s} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 10}|{'-' * 16}|")
    for k, secs in best.items():
        ips = n / secs
        print(f"| {k:28s} | {secs / n:8.4f} | {ips:8.1f} | {ips / ours_ips:13.2f}x |")
    raw_ratio = ours_ips / (n / best["raw onnxruntime loop"])
    slow = best["NudeDetector per image"] / best["conceptlock NudeNetMetric"]
    print(f"\nconceptlock / raw onnxruntime throughput: {raw_ratio:.3f} (goal >= 0.9)")
    print(f"NudeDetector-per-image is {slow:.2f}x slower than conceptlock (goal >= 5)")


if __name__ == "__main__":
    main()
