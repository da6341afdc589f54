"""An evolution's configuration: the budgets and :class:`EvolveConfig` (torch-free, so the
command line can describe them without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass

from mutask.errors import MutaskError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # see mutask.evolve.train.autocast_dtype

# The root `mutask evolve` and `mutask demo` use without --root: ImageNet EfficientNet-Lite0 from
# its wheel (mutask.evolve.realroot). The toy `mutask pretrain` ViT is for tests only.
DEFAULT_ROOT = "efficientnet-lite0"

# Where new tasks start on a real root without --image-size (muNet's mutations move it from
# there): the suite's 32 px images upsampled to 64 px. Chosen from benchmarks/results/image-size.md
# (a linear probe of the frozen lite0 at 32/64/96 px: 64 px is far above 32 px, 96 px adds little
# for 2.2x the compute).
REAL_ROOT_IMAGE_SIZE = {"efficientnet-lite0": 64, "efficientnet-lite1": 64, "efficientnet-lite2": 64}

BUDGETS = {
    "tiny": dict(rounds=1, children=3, generation_size=3, steps=6, validations=1, batch_size=32),
    # `mutask demo` / `make demo`: the embedded suite on the default root within 15 minutes on 2 CPU cores
    # children 8 in generations of 4, 120 steps: chosen from short trials (benchmarks/results/demo-sizing.md), the
    # smallest tried that beat the toy demo on its hardest tasks (orientation, font_style); a second generation matters
    "demo": dict(rounds=1, children=8, generation_size=4, steps=120, validations=2, batch_size=32),
    "quick": dict(rounds=2, children=8, generation_size=4, steps=200, validations=3, batch_size=64),
    "full": dict(rounds=2, children=24, generation_size=8, steps=200, validations=3, batch_size=64),
    # a GPU (docs/gpu.md): more and longer children, large batches
    "gpu": dict(rounds=3, children=32, generation_size=8, steps=500, validations=4, batch_size=256),
}
DEMO_BUDGET = "demo"


@dataclass
class EvolveConfig:
    rounds: int = 1
    children: int = 8
    generation_size: int = 4
    steps: int = 60
    validations: int = 2
    batch_size: int = 64
    scale_factor: float = 1.0
    mutation_prob: float | None = None  # None: auto-tuned (mu2Net)
    # The learning rate a task's first paths start from (None: hparams.DEFAULTS' 0.01); muNet's
    # mutations move it along its list from there. A prior, like the starting image size.
    lr: float | None = None
    # Whether a task's later visits seed from the root again (the reference does); False spends
    # that child on the population instead (a task with a best path has already tried the root).
    reseed_root: bool = True
    # Whether each generation's first child after the seeds is the visit's best path, unmutated:
    # it trains what the best path trains a little longer (children of a lineage inherit their
    # parent's trained clones and adapters), where the short children of a small budget stop
    # before their new components converge.
    continue_best: bool = False
    seed: int = 0
    strategy: str = "munet"  # munet | finetune | freeze:K | adapters:W
    budget: str = "quick"
    precision: str = "auto"  # auto (bf16 on a CUDA GPU, fp32 on the CPU) | fp32 | bf16 | fp16

    @classmethod
    def from_budget(cls, budget: str, **overrides) -> "EvolveConfig":
        if budget not in BUDGETS:
            raise MutaskError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}.")
        cfg = cls(budget=budget, **BUDGETS[budget])
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for k in ("rounds", "children", "generation_size", "steps", "validations", "batch_size"):
            if int(getattr(self, k)) < 1:
                raise MutaskError(f"--{k.replace('_', '-')} must be at least 1 (got {getattr(self, k)}).")
        if not 0.0 < self.scale_factor <= 1.0:
            raise MutaskError(f"--scale-factor must be in (0, 1] (got {self.scale_factor}); 1.0 scores accuracy alone.")
        if self.mutation_prob is not None and not 0.0 <= self.mutation_prob <= 1.0:
            raise MutaskError(f"--mutation-prob must be in [0, 1] (got {self.mutation_prob}).")
        if self.lr is not None and not 0.0 < self.lr <= 1.0:
            raise MutaskError(f"--lr must be in (0, 1] (got {self.lr}).")
        from .strategies import parse_strategy  # torch; the CLI's help reads BUDGETS without it

        parse_strategy(self.strategy)
        if self.precision not in PRECISIONS:
            raise MutaskError(f"unknown precision {self.precision!r}; use {', '.join(PRECISIONS)}.")
