"""Structure policies of the evolution loop: muNet, and the baselines that run through the same
loop and budget with a fixed structure instead of muNet's mutations.

===============  ==========================  ==================  ========================================
strategy         a visit's seeds             structure mutates   a child clones (besides norm, head and
                                                                 every still-trainable component)
===============  ==========================  ==================  ========================================
``munet``        every other task's best     yes (adapters,      each component with probability mu
                 path, and the root          depth)
``munet-noseed``  the root (ablation: no      yes                 each component with probability mu
                 cross-task seeds)
``finetune``     the root                    no                  everything
``freeze:K``     the root                    no                  blocks K and up and the tail (the stem:
                                                                 embeddings or conv stem, and the bottom
                                                                 K blocks stay shared, frozen)
``adapters:W``   the root                    no                  nothing: an adapter of width W before
                                                                 every block is trained instead
===============  ==========================  ==================  ========================================

:func:`parse_strategy` turns the spec (``EvolveConfig.strategy``) into its policy object.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mutask.errors import MutaskError

from .model import Component


class Strategy:
    """A structure policy. ``transfer``: a visit also seeds from other tasks' best paths;
    ``mutates_structure``: children may insert adapters and change depth; ``adapter_width``:
    when set, every block gets an adapter of this width."""

    transfer: bool = False
    mutates_structure: bool = False
    adapter_width: int | None = None

    def seed_candidates(self, other_best: list[str]) -> list[str]:
        """The paths a visit may try unmutated first, given the other tasks' best path ids."""
        return list(other_best) + ["root"] if self.transfer else ["root"]

    def must_clone(self, name: str, component: Component, mu: float, rng: random.Random, root) -> bool:
        """Whether a child takes its own trainable copy of ``component`` (called ``name`` in
        the path of a ``root``) rather than sharing it frozen. The final norm
        (``root.always_cloned``) and components nothing locks yet are always cloned; the rest
        is the strategy's :meth:`clones_shared`."""
        if name in root.always_cloned or component.trainable:
            return True
        return self.clones_shared(name, mu, rng, root)

    def clones_shared(self, name: str, mu: float, rng: random.Random, root) -> bool:
        """Whether a child clones the locked or root component ``name``."""
        raise NotImplementedError


class MuNet(Strategy):
    """muNet: transfer from every task, mutate structure, clone each component with probability mu."""

    transfer = True
    mutates_structure = True

    def clones_shared(self, name: str, mu: float, rng: random.Random, root) -> bool:
        return rng.random() < mu

    def __str__(self) -> str:
        return "munet"


class MuNetNoSeed(MuNet):
    """muNet without cross-task seeds (an ablation): structure still mutates, but a visit
    seeds only from the root, never from other tasks' best paths."""

    transfer = False

    def __str__(self) -> str:
        return "munet-noseed"


class FineTune(Strategy):
    """Fine-tune everything: every component is cloned."""

    def clones_shared(self, name: str, mu: float, rng: random.Random, root) -> bool:
        return True

    def __str__(self) -> str:
        return "finetune"


@dataclass(frozen=True)
class Freeze(Strategy):
    """Share the stem (a ViT's embeddings, a CNN's stem) and the bottom ``blocks`` blocks
    frozen; clone the rest (the blocks above, and the tail)."""

    blocks: int

    def clones_shared(self, name: str, mu: float, rng: random.Random, root) -> bool:
        pos = root.block_position(name)
        return (pos is not None and pos >= self.blocks) or name in root.tail

    def __str__(self) -> str:
        return f"freeze:{self.blocks}"


@dataclass(frozen=True)
class Adapters(Strategy):
    """The root frozen; an adapter of ``width`` before every block (0: no adapters)."""

    width: int

    @property
    def adapter_width(self) -> int:
        return self.width

    def clones_shared(self, name: str, mu: float, rng: random.Random, root) -> bool:
        return False

    def __str__(self) -> str:
        return f"adapters:{self.width}"


def parse_strategy(spec: str) -> Strategy:
    """``munet``, ``munet-noseed``, ``finetune``, ``freeze:K`` or ``adapters:W`` -> its :class:`Strategy`;
    :class:`MutaskError` otherwise."""
    kind, _, arg = str(spec).partition(":")
    try:
        if kind == "munet":
            return MuNet()
        if kind == "munet-noseed":
            return MuNetNoSeed()
        if kind == "finetune":
            return FineTune()
        if kind in ("freeze", "adapters") and arg.isdigit():
            return Freeze(int(arg)) if kind == "freeze" else Adapters(int(arg))
    except ValueError:
        pass
    raise MutaskError(f"unknown strategy {spec!r}; use munet, finetune, freeze:K or adapters:W. (Or munet-noseed: muNet without cross-task seeds.)")
