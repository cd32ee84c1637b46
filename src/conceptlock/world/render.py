"""Procedural renderer of the toy world: a `Scene` in, an RGB uint8 image out, deterministically.

Pure numpy, supersampled 2x for anti-aliasing, any square resolution (32 is the default world).
The same `Scene` and seed always give the same pixels (tests check it), so data sets, prompt sets
and judges can be rebuilt bit for bit from a config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .concepts import COLOUR_RGB, GLYPH_CHARS

_GLYPHS = {
    "A": [".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
    "E": ["#####", "#....", "#....", "####.", "#....", "#....", "#####"],
    "H": ["#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
    "K": ["#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"],
    "M": ["#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"],
    "N": ["#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#"],
    "R": ["####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"],
    "T": ["#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."],
    "X": ["#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"],
    "Z": ["#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"],
    "2": [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
    "3": ["####.", "....#", "....#", ".###.", "....#", "....#", "####."],
    "5": ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
    "7": ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
}
assert set(_GLYPHS) == set(GLYPH_CHARS)

_POS_X = {"left": -0.3, "center": 0.0, "right": 0.3}  # fraction of the half-width
_RADIUS = {"small": 0.34, "large": 0.56}  # fraction of the half-width


@dataclass(frozen=True)
class Scene:
    """Everything that determines one image. `harm` lists harmful overlays drawn on top."""

    shape: str = "circle"
    colour: str = "red"
    background: str = "white"
    size: str = "large"
    position: str = "center"
    style: str = "solid"
    harm: tuple[str, ...] = field(default=())
    domain: str | None = None  # None (pretraining world), "mosaic" or "glyphs"
    glyph: str | None = None  # the character, for the glyphs domain
    seed: int = 0  # jitter, texture and overlay randomness

    def to_dict(self) -> dict:
        d = asdict(self)
        d["harm"] = list(self.harm)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        d = dict(d)
        d["harm"] = tuple(d.get("harm", ()))
        return cls(**d)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a unit shape in object coordinates (radius 1, v pointing down)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.8
    if shape == "triangle":
        return (v <= 0.8) & (au <= (v + 0.95) * 0.62)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "star":
        theta = np.arctan2(v, u) + np.pi / 2
        seg = 2 * np.pi / 5
        a = np.abs(np.mod(theta, seg) - seg / 2) / (seg / 2)  # 0 at a tip, 1 between tips
        rmax = 1.0 - 0.58 * a
        return np.sqrt(u * u + v * v) <= rmax
    if shape == "heart":
        x, y = u * 1.15, -v * 1.15 + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    raise ValueError(f"shape: unknown shape {shape!r}")


def _background(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    yy = np.linspace(0.0, 1.0, n)[:, None, None]
    if name == "white":
        img = np.full((n, n, 3), 232.0)
    elif name == "black":
        img = np.full((n, n, 3), 22.0)
    elif name == "sky":
        top, bottom = np.array([110.0, 160.0, 230.0]), np.array([200.0, 225.0, 250.0])
        img = np.broadcast_to(top + (bottom - top) * yy, (n, n, 3)).copy()
    elif name == "grass":
        top, bottom = np.array([175.0, 215.0, 140.0]), np.array([120.0, 170.0, 80.0])
        img = np.broadcast_to(top + (bottom - top) * yy, (n, n, 3)).copy()
    else:
        raise ValueError(f"background: unknown background {name!r}")
    img += rng.normal(0.0, 3.0, size=(1, 1, 3)) + rng.normal(0.0, 2.0, size=(n, n, 1))
    return img


def _object_mask(scene: Scene, n: int, rng: np.random.Generator) -> np.ndarray:
    """Coverage mask in [0, 1] of the object, at resolution n (supersampled already)."""
    half = n / 2.0
    radius = _RADIUS[scene.size] * half * rng.uniform(0.9, 1.1)
    cx = half + _POS_X[scene.position] * half + rng.uniform(-0.04, 0.04) * half
    cy = half + rng.uniform(-0.06, 0.06) * half
    ys, xs = np.mgrid[0:n, 0:n] + 0.5
    u, v = (xs - cx) / radius, (ys - cy) / radius
    if scene.domain == "glyphs":
        rows = _GLYPHS[scene.glyph or "A"]
        gh, gw = len(rows), len(rows[0])
        cell = 2.0 * radius / gh
        gx = np.floor((xs - (cx - cell * gw / 2)) / cell).astype(int)
        gy = np.floor((ys - (cy - cell * gh / 2)) / cell).astype(int)
        grid = np.array([[c == "#" for c in r] for r in rows])
        ok = (gx >= 0) & (gx < gw) & (gy >= 0) & (gy < gh)
        mask = np.zeros((n, n), bool)
        mask[ok] = grid[gy[ok], gx[ok]]
        return mask.astype(np.float64)
    inside = _shape_mask(scene.shape, u, v)
    if scene.style == "outline":
        stroke = 0.13 * half / radius * 1.0
        s = max(1.0 - 2.2 * stroke, 0.2)
        inner = _shape_mask(scene.shape, u / s, v / s)
        inside = inside & ~inner
    return inside.astype(np.float64)


def _blend(img: np.ndarray, mask: np.ndarray, rgb: np.ndarray) -> None:
    img *= 1.0 - mask[..., None]
    img += mask[..., None] * rgb


def _draw_gore(img: np.ndarray, n: int, rng: np.random.Generator, obj: np.ndarray) -> None:
    """Dark-red splatter: blobs scattered over and around the object, with drips running down."""
    ys, xs = np.mgrid[0:n, 0:n] + 0.5
    oy, ox = np.nonzero(obj > 0.5)
    k = int(rng.integers(6, 10))
    mask = np.zeros((n, n))
    for _ in range(k):
        if len(ox) and rng.random() < 0.7:
            i = rng.integers(len(ox))
            cx, cy = ox[i] + rng.normal(0, n * 0.05), oy[i] + rng.normal(0, n * 0.05)
        else:
            cx, cy = rng.uniform(0.1, 0.9) * n, rng.uniform(0.1, 0.9) * n
        rx, ry = rng.uniform(0.035, 0.08) * n, rng.uniform(0.03, 0.07) * n
        mask = np.maximum(mask, (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0).astype(float))
        if rng.random() < 0.5:  # a drip
            w = rng.uniform(0.015, 0.03) * n
            length = rng.uniform(0.1, 0.25) * n
            drip = (np.abs(xs - cx) <= w) & (ys >= cy) & (ys <= cy + length)
            mask = np.maximum(mask, drip.astype(float))
    colour = np.array([120.0, 4.0, 8.0]) + rng.normal(0, 8, 3)
    _blend(img, mask, colour)


def _draw_fire(img: np.ndarray, n: int, rng: np.random.Generator, obj: np.ndarray) -> None:
    """Flames: jagged tongues rising from the bottom edge and licking the object, yellow to red."""
    ys, xs = np.mgrid[0:n, 0:n] + 0.5
    f1, f2 = rng.uniform(3.0, 5.0), rng.uniform(7.0, 11.0)
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    x = xs[0] / n
    height = n * (0.3 + 0.12 * np.abs(np.sin(2 * np.pi * f1 * x + p1)) + 0.08 * np.sin(2 * np.pi * f2 * x + p2))
    top = n - height  # flame top edge per column
    mask = (ys >= top[None, :]).astype(float)
    # tongues on the object's top edge
    oy, ox = np.nonzero(obj > 0.5)
    if len(ox):
        for _ in range(int(rng.integers(2, 4))):
            i = rng.integers(len(ox))
            cx, cy = ox[i], oy[i]
            h, w = rng.uniform(0.12, 0.2) * n, rng.uniform(0.04, 0.07) * n
            tongue = (np.abs(xs - cx) <= w * (1 - (cy - ys) / h)) & (ys <= cy) & (ys >= cy - h)
            mask = np.maximum(mask, tongue.astype(float))
    t = np.clip((ys - (n - height[None, :] * 1.0)) / (0.35 * n), 0, 1)  # 0 at the tip, 1 deep
    yellow, red = np.array([255.0, 225.0, 50.0]), np.array([225.0, 55.0, 10.0])
    colour = yellow * (1 - t[..., None]) + red * t[..., None]
    img *= 1.0 - mask[..., None]
    img += mask[..., None] * colour


_OVERLAYS = {"gore": _draw_gore, "fire": _draw_fire}


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Render `scene` as an (size, size, 3) uint8 RGB array. Deterministic in `scene.seed`."""
    rng = np.random.default_rng(scene.seed)
    n = size * 2  # supersampling
    img = _background(scene.background, n, rng)
    obj = _object_mask(scene, n, rng)
    rgb = np.array(COLOUR_RGB[scene.colour], dtype=np.float64) + rng.normal(0, 6, 3)
    if scene.style == "solid" or scene.domain == "glyphs":
        shade = 1.0 - 0.12 * (np.mgrid[0:n, 0:n][0] / n)  # soft top light
        _blend(img, obj * 1.0, rgb)
        img = np.where(obj[..., None] > 0, img * shade[..., None] / shade.mean(), img)
    else:
        _blend(img, obj, rgb)
    for h in scene.harm:
        if h not in _OVERLAYS:
            raise ValueError(f"harm: unknown harmful concept {h!r}")
        _OVERLAYS[h](img, n, rng, obj)
    if scene.domain == "mosaic":
        cells = max(n // 8, 1)
        blocks = img.reshape(n // cells, cells, n // cells, cells, 3).mean(axis=(1, 3))
        img = np.repeat(np.repeat(blocks, cells, 0), cells, 1)
        grid = (np.mgrid[0:n, 0:n] % cells == 0).any(axis=0)
        img[grid] *= 0.55
    img = img.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
