"""Drawing one image of the demo dataset (see :mod:`dcml.data.demo` for the classes).

Scenes are drawn at twice the target size and box-downsampled (anti-aliasing), then
pixel noise is added. Geometry is in units of the image side, so any size works. All
randomness comes from the ``rng`` argument.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

_SUPERSAMPLE = 2
_RADIUS_BY_COUNT = {1: (0.16, 0.24), 2: (0.12, 0.16), 3: (0.10, 0.13), 4: (0.09, 0.12)}


def render_image(group: str, factors: tuple, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of a class of ``group`` with ``factors``: uint8 (image_size, image_size, 3)."""
    size = _SUPERSAMPLE * image_size
    background = _background(size, rng)
    draw = {"shape": _shape_scene, "colour": _colour_scene, "texture": _texture_scene}[group]
    colour, alpha = draw(factors, size, rng)
    scene = background * (1 - alpha[..., None]) + colour * alpha[..., None]
    scene = scene.reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    scene = scene + rng.normal(0.0, rng.uniform(0.01, 0.04), scene.shape)
    return (np.clip(scene, 0.0, 1.0) * 255).round().astype(np.uint8)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Low-saturation grey with a random linear gradient and clutter lines: float (S, S, 3)."""
    base = rng.uniform(0.15, 0.45) + rng.uniform(-0.04, 0.04, 3)
    direction = rng.normal(size=2)
    ramp = np.linspace(-1, 1, size)
    gradient = (direction[0] * ramp[None, :] + direction[1] * ramp[:, None]) / np.linalg.norm(direction)
    pixels = base + rng.uniform(0.0, 0.08) * gradient[..., None]
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 8)):
        grey = int(255 * np.clip(base.mean() + rng.uniform(-0.15, 0.15), 0, 1))
        draw.line([tuple(rng.uniform(0, size, 2)), tuple(rng.uniform(0, size, 2))], fill=(grey,) * 3, width=2)
    return np.asarray(image, dtype=np.float64) / 255.0


def _shape_scene(factors: tuple, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    shape, count = factors
    radius = rng.uniform(*_RADIUS_BY_COUNT[count])
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for centre in _place(count, radius, rng):
        outer, hole = _unit_shape(shape)
        transform = _similarity(centre, radius * rng.uniform(0.9, 1.1), rng.uniform(0, 2 * np.pi), size)
        draw.polygon(transform(outer), fill=255)
        if hole is not None:
            draw.polygon(transform(hole), fill=0)
    colour = np.full(3, 0.85 + rng.uniform(-0.08, 0.08))
    return colour, np.asarray(mask, dtype=np.float64) / 255.0


def _place(count: int, radius: float, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` centres (unit coords) at least 2.6 radii apart, inside the image."""
    while True:
        centres: list[np.ndarray] = []
        for _ in range(200):
            candidate = rng.uniform(1.2 * radius, 1 - 1.2 * radius, 2)
            if all(np.linalg.norm(candidate - c) >= 2.6 * radius for c in centres):
                centres.append(candidate)
                if len(centres) == count:
                    return centres
        radius *= 0.9  # crowded draw: retry with room to spare


def _similarity(centre: np.ndarray, scale: float, angle: float, size: int):
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    def transform(points: np.ndarray) -> list[tuple[float, float]]:
        return [tuple(p) for p in (points @ rotation.T * scale + centre) * size]

    return transform


def _unit_shape(name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Outline (k, 2) of a shape of radius ~1 around the origin, and an optional hole."""
    if name in ("circle", "ring", "crescent"):
        hole = {"circle": None, "ring": _ellipse(0.55, 0.55), "crescent": _ellipse(0.8, 0.8, 0.45)}[name]
        return _ellipse(0.95, 0.95), hole
    if name == "star":
        points = _regular(10, -90) * np.where(np.arange(10) % 2, 0.45, 1.0)[:, None]
        return points, None
    sides = {"square": (4, 45), "triangle": (3, -90), "pentagon": (5, -90)}
    if name in sides:
        return _regular(*sides[name]), None
    polygons = {
        "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1),
                  (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
        "bar": [(-1, -0.28), (1, -0.28), (1, 0.28), (-1, 0.28)],
        "tee": [(-1, -1), (1, -1), (1, -0.45), (0.28, -0.45), (0.28, 1), (-0.28, 1), (-0.28, -0.45),
                (-1, -0.45)],
    }  # fmt: skip
    return np.array(polygons[name], dtype=np.float64), None


def _regular(corners: int, start_degrees: float) -> np.ndarray:
    angles = np.deg2rad(start_degrees) + 2 * np.pi * np.arange(corners) / corners
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _ellipse(rx: float, ry: float, cx: float = 0.0) -> np.ndarray:
    angles = 2 * np.pi * np.arange(48) / 48
    return np.stack([cx + rx * np.cos(angles), ry * np.sin(angles)], axis=1)


def _colour_scene(factors: tuple, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    hue, saturation, value = factors
    radius = rng.uniform(0.2, 0.3)
    outline = _ellipse(1.0, rng.uniform(0.7, 1.0))
    centre = rng.uniform(radius + 0.05, 0.95 - radius, 2)
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(_similarity(centre, radius, rng.uniform(0, np.pi), size)(outline), fill=255)
    hue = ((hue + rng.uniform(-4, 4)) % 360) / 360
    jitter = rng.uniform(-0.05, 0.05, 2)
    colour = np.array(colorsys.hsv_to_rgb(hue, *np.clip([saturation, value] + jitter, 0, 1)))
    return colour, np.asarray(mask, dtype=np.float64) / 255.0


def _texture_scene(factors: tuple, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    pattern, angle, period_px = factors
    period = period_px / 64 * rng.uniform(0.95, 1.05)  # unit coords, as in a 64 px image
    theta = np.deg2rad(angle + rng.uniform(-6, 6))
    radius = rng.uniform(0.3, 0.4)
    centre = rng.uniform(0.8 * radius, 1 - 0.8 * radius, 2)
    coords = (np.arange(size) + 0.5) / size
    x, y = coords[None, :] - centre[0], coords[:, None] - centre[1]
    u = (x * np.cos(theta) + y * np.sin(theta)) / period + rng.uniform(0, 1)
    v = (-x * np.sin(theta) + y * np.cos(theta)) / period + rng.uniform(0, 1)
    on = _pattern(pattern, u, v)
    dark, light = rng.uniform(0.05, 0.2), rng.uniform(0.8, 0.95)
    colour = (dark + (light - dark) * on)[..., None].repeat(3, axis=2)
    return colour, (np.hypot(x, y) < radius).astype(np.float64)


def _pattern(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """1.0 where the pattern is light, from coordinates in periods along/across its angle."""
    fu, fv = u % 1.0, v % 1.0
    if name == "stripes":
        on = fu < 0.5
    elif name == "checker":
        on = (np.floor(u) + np.floor(v)) % 2 == 0
    elif name == "dots":
        on = np.hypot(fu - 0.5, fv - 0.5) < 0.28
    elif name == "grid":
        on = (fu < 0.22) | (fv < 0.22)
    else:  # zigzag: stripes bent by a triangle wave along the other axis
        on = (u + 0.5 * np.abs((v / 2) % 1.0 * 2 - 1)) % 1.0 < 0.5
    return on.astype(np.float64)
