"""An embedded dataset: coloured geometric shapes on noisy backgrounds, generated from the seed.

Ten classes, 32x32 RGB uint8, no files and no network:

    0 circle      1 square        2 triangle (pointing up)   3 X (diagonal cross)   4 ring
    5 horizontal bar   6 vertical bar   7 diamond   8 plus   9 ellipse (horizontal)

What makes it harder than telling ten silhouettes apart:

- every shape is jittered in position (+-6 px), size (radius 6..12 px), aspect (+-15 %) and
  rotation (+-0.3 rad, small enough that square/diamond and plus/X stay distinct classes, large
  enough that no class is a fixed template), so near pairs overlap: circle/ellipse/ring,
  square/diamond, plus/X, bar/ellipse;
- the foreground colour is arbitrary: each channel steps 0.1..0.5 up or down from the background,
  so the contrast has no fixed sign and can be faint;
- the background is a random colour with a random linear gradient, with a distractor (a thin
  line or a small blob) drawn on about half of the images;
- per-pixel Gaussian noise on top of everything (sigma 0.025..0.1 per image).

Everything is rasterised with batched torch ops on coordinate grids (one pass per class), so
12k images take about two seconds on 2 CPU cores. Train and test come from different random streams.
"""

from __future__ import annotations

import math

import torch

from lctrun.data.bundle import DataBundle, channel_stats

CLASSES = (
    "circle",
    "square",
    "triangle",
    "x-cross",
    "ring",
    "horizontal-bar",
    "vertical-bar",
    "diamond",
    "plus",
    "ellipse",
)
SIZE = 32
# Calibrated so that cnn_small (SGD 0.05, momentum 0.9, batch 128) reaches about 60-90 % test accuracy
# after a minute of 2-core CPU training on 10k/2k; noise is a per-image sigma range on the 0..1 scale.
DIFFICULTY = dict(noise=(0.025, 0.1), contrast=(0.1, 0.5), distract=True, pos=6.0, rmin=6.0, rot=0.3)


def _box(u: torch.Tensor, v: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Signed distance (approximate outside the corners) to the box |u|<=a, |v|<=b."""
    return torch.maximum(u.abs() - a, v.abs() - b)


def _sdf(cls: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance (shape units, <= 0 inside) of class `cls` at coordinates (u, v)."""
    r = torch.sqrt(u * u + v * v)
    if cls == 0:  # circle
        return r - 1.0
    if cls == 1:  # square
        return _box(u, v, 0.82, 0.82)
    if cls == 2:  # equilateral triangle, pointing up (image rows grow downwards: up is -v)
        s3 = math.sqrt(3.0)
        return torch.maximum(torch.maximum(v - 0.55, (s3 * u - v) / 2 - 0.55), (-s3 * u - v) / 2 - 0.55)
    if cls == 3:  # X: two diagonal bars
        d1, d2 = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
        return torch.minimum(_box(d1, d2, 1.0, 0.24), _box(d2, d1, 1.0, 0.24))
    if cls == 4:  # ring
        return (r - 0.78).abs() - 0.24
    if cls == 5:  # horizontal bar
        return _box(u, v, 1.0, 0.3)
    if cls == 6:  # vertical bar
        return _box(u, v, 0.3, 1.0)
    if cls == 7:  # diamond
        return (u.abs() + v.abs() - 1.1) / math.sqrt(2)
    if cls == 8:  # plus
        return torch.minimum(_box(u, v, 1.0, 0.24), _box(u, v, 0.24, 1.0))
    if cls == 9:  # ellipse, wider than high
        return (torch.sqrt((u / 1.0) ** 2 + (v / 0.6) ** 2) - 1.0) * 0.6
    raise ValueError(cls)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def generate_shapes(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images (n, 3, 32, 32) uint8 and balanced labels (n,) int64, drawn from `generator`."""
    g = generator
    labels = torch.arange(n) % len(CLASSES)
    labels = labels[torch.randperm(n, generator=g)]

    coords = torch.arange(SIZE, dtype=torch.float32) + 0.5 - SIZE / 2  # pixel centres, origin mid-image
    ys, xs = coords[None, :, None], coords[None, None, :]  # (1, H, 1), (1, 1, W)

    # Per-sample geometry.
    cx, cy = (
        _uniform(n, -DIFFICULTY["pos"], DIFFICULTY["pos"], g),
        _uniform(n, -DIFFICULTY["pos"], DIFFICULTY["pos"], g),
    )
    radius = _uniform(n, DIFFICULTY["rmin"], 12.0, g)  # pixels per shape unit
    aspect = torch.exp(_uniform(n, -0.15, 0.15, g))
    theta = _uniform(n, -DIFFICULTY["rot"], DIFFICULTY["rot"], g)
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    px, py = xs - cx[:, None, None], ys - cy[:, None, None]
    u = (cos * px + sin * py) / (radius * aspect)[:, None, None]
    v = (-sin * px + cos * py) / (radius / aspect)[:, None, None]

    # Coverage with a one-pixel soft edge (anti-aliased), one batched pass per class.
    alpha = torch.empty(n, SIZE, SIZE)
    for c in range(len(CLASSES)):
        sel = (labels == c).nonzero().squeeze(1)
        if len(sel):
            d = _sdf(c, u[sel], v[sel]) * radius[sel, None, None]
            alpha[sel] = (0.5 - d).clamp(0.0, 1.0)

    # Background: random colour plus a random linear gradient.
    bg = torch.rand(n, 3, 1, 1, generator=g)
    grad = (torch.rand(n, 3, 2, generator=g) - 0.5) * 0.5 / SIZE  # up to +-0.25 across the image
    img = bg + grad[..., 0, None, None] * xs[:, None] + grad[..., 1, None, None] * ys[:, None]

    # Distractor on about half of the images: a thin line or a small blob, in its own colour.
    dcol = torch.rand(n, 3, 1, 1, generator=g)
    kind = torch.randint(0, 3, (n,), generator=g)  # 0 none, 1 line, 2 blob (none: ~1/3, plus misses)
    ox, oy = _uniform(n, -14, 14, g)[:, None, None], _uniform(n, -14, 14, g)[:, None, None]
    phi = _uniform(n, 0, math.pi, g)[:, None, None]
    line = (0.6 - ((xs - ox) * torch.sin(phi) - (ys - oy) * torch.cos(phi)).abs()).clamp(0, 1)
    line = line * ((xs - ox) ** 2 + (ys - oy) ** 2 < 64.0)  # a segment about 16 px long
    blob = (2.5 - torch.sqrt((xs - ox) ** 2 + (ys - oy) ** 2)).clamp(0, 1)
    dmask = torch.where((kind == 1)[:, None, None], line, torch.where((kind == 2)[:, None, None], blob, 0.0))
    img = img + DIFFICULTY["distract"] * dmask[:, None] * (dcol - img)

    # Foreground colour: each channel a random step of DIFFICULTY["contrast"] up or down from the background
    # (down where up would leave 0..1), so every shape stays visible but its colour is arbitrary.
    step = DIFFICULTY["contrast"][0] + (DIFFICULTY["contrast"][1] - DIFFICULTY["contrast"][0]) * torch.rand(
        n, 3, 1, 1, generator=g
    )
    sign = torch.where(torch.rand(n, 3, 1, 1, generator=g) < 0.5, 1.0, -1.0)
    fg = bg + sign * step
    fg = torch.where((fg < 0) | (fg > 1), bg - sign * step, fg).clamp(0.0, 1.0)
    img = img + alpha[:, None] * (fg - img)

    # Sensor noise, with a per-image level.
    sigma = _uniform(n, *DIFFICULTY["noise"], g)[:, None, None, None]
    img = img + sigma * torch.randn(n, 3, SIZE, SIZE, generator=g)
    x = (img.clamp(0.0, 1.0) * 255.0).round_().to(torch.uint8)
    return x, labels.long()


def load_shapes(train_size: int, test_size: int, seed: int) -> DataBundle:
    """The shapes dataset; train and test come from separate generator streams of `seed`."""
    train_x, train_y = generate_shapes(train_size, torch.Generator().manual_seed(seed * 1_000_003 + 1))
    test_x, test_y = generate_shapes(test_size, torch.Generator().manual_seed(seed * 1_000_003 + 2))
    mean, std = channel_stats(train_x)
    return DataBundle(
        name="shapes",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=len(CLASSES),
        mean=mean,
        std=std,
        augment="none",
    )
