"""Hyperparameters of a path and their one-step mutation on ordered lists (muNet / mu2Net).

Every tunable key has an ordered list of values; a mutation moves a key one step up or down
its list with probability mu (never a jump). ``mu`` itself is a key (mu2Net's auto-tuning):
it is mutated first, with the parent's own mu, and the new mu drives the rest. The data
pipeline keys are drawn once per generation and shared by its children.
"""

from __future__ import annotations

import random

LISTS: dict[str, list] = {
    "mu": [0.10, 0.15, 0.20, 0.25, 0.30],
    "lr": [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1],
    "lr_schedule": ["constant", "cosine", "restarts"],
    "warmup_ratio": [0.01, 0.05, 0.1, 0.2, 0.3, 0.4],
    "momentum": [0.2, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99],
    "nesterov": [False, True],
    "image_size": [16 * i for i in range(1, 25)],  # 16, 32, ..., 384
    "crop_area_min": [0.05, 0.2, 0.4, 0.6, 0.8, 1.0],
    "aspect_ratio_min": [0.5, 0.75, 1.0],
    "flip": [False, True],
    "color_jitter": [0.0, 0.1, 0.2, 0.3],
    "adapter_width": [8, 16, 32, 64, 128],
}

DEFAULTS: dict = {
    "mu": 0.10,
    "lr": 0.01,
    "lr_schedule": "cosine",
    "warmup_ratio": 0.1,
    "momentum": 0.9,
    "nesterov": False,
    "image_size": 32,
    "crop_area_min": 1.0,
    "aspect_ratio_min": 1.0,
    "flip": False,
    "color_jitter": 0.0,
    "adapter_width": 32,
    "num_blocks": 1,  # set from the root's depth
}

# Keys of the data pipeline: drawn once per generation, shared by the generation's children.
DATA_KEYS = ("image_size", "crop_area_min", "aspect_ratio_min", "flip", "color_jitter")
# Keys of the training recipe: mutated per child.
TRAIN_KEYS = ("lr", "lr_schedule", "warmup_ratio", "momentum", "nesterov", "adapter_width")


def defaults(image_size: int, num_blocks: int) -> dict:
    hp = dict(DEFAULTS)
    hp["image_size"] = snap("image_size", image_size)
    hp["num_blocks"] = num_blocks
    return hp


def snap(key: str, value):
    """The list value nearest to ``value`` (for numbers), or value itself if listed."""
    values = LISTS[key]
    if value in values:
        return value
    return min(values, key=lambda v: abs(v - value))


def step(key: str, value, rng: random.Random, *, values: list | None = None):
    """Move ``value`` one step up or down (at random) its ordered list (``values`` for a key
    without a fixed list: ``num_blocks``, the root's depths); clamped at the ends."""
    if values is None:
        values, value = LISTS[key], snap(key, value)
    i = values.index(value) if value in values else min(range(len(values)), key=lambda j: abs(values[j] - value))
    return values[max(0, min(len(values) - 1, i + rng.choice((-1, 1))))]


def mutate(hp: dict, keys, mu: float, rng: random.Random, *, depths: list[int] | None = None) -> dict:
    """Each key in ``keys`` moves one step with probability ``mu``; ``num_blocks`` along
    ``depths`` (the root's: 1 .. depth for a ViT, fewer where a CNN's shapes allow fewer)."""
    out = dict(hp)
    for key in keys:
        if rng.random() < mu:
            out[key] = step(key, out[key], rng, values=depths if key == "num_blocks" else None)
    return out


def mutate_mu(hp: dict, rng: random.Random, fixed: float | None) -> dict:
    """mu2Net: mutate mu first, with the parent's own mu; or pin it to a fixed value."""
    out = dict(hp)
    if fixed is not None:
        out["mu"] = fixed
    elif rng.random() < out["mu"]:
        out["mu"] = step("mu", out["mu"], rng)
    return out
