"""What the evolution loop tells the outside (:class:`Hook`), and the two hooks ``mutask
evolve`` plugs in: :class:`Checkpoint` (save the STATE at every boundary, so ``--resume``
continues from the last one) and :class:`ProgressBar` (a progress bar per visit). The loop
(:class:`~.evolution.Evolution`) calls them; they change nothing it decides."""

from __future__ import annotations

from pathlib import Path


class Hook:
    """The loop's events; each does nothing unless a hook overrides it."""

    def boundary(self, system) -> None:
        """The system is consistent: a visit started or ended, or a generation was judged."""

    def visit_started(self, task: str, round_: int, rounds: int, done: int, total: int) -> None:
        """A visit of ``task`` in round ``round_`` (0 first) of ``rounds`` starts or resumes with
        ``done`` of its ``total`` children trained."""

    def child_done(self) -> None:
        """One child of the generation in flight finished training (in any order)."""

    def generation_done(self, generation: int, best) -> None:
        """Generation ``generation`` (1 first) was judged; ``best``: the visit's best path so far (or None)."""

    def visit_done(self, task: str) -> None:
        """Every child of the visit is judged; the visit ends."""


class Hooks(Hook):
    """Several hooks as one, called in order."""

    def __init__(self, hooks=()):
        self.hooks = list(hooks)

    def boundary(self, system) -> None:
        for h in self.hooks:
            h.boundary(system)

    def visit_started(self, *args) -> None:
        for h in self.hooks:
            h.visit_started(*args)

    def child_done(self) -> None:
        for h in self.hooks:
            h.child_done()

    def generation_done(self, *args) -> None:
        for h in self.hooks:
            h.generation_done(*args)

    def visit_done(self, task: str) -> None:
        for h in self.hooks:
            h.visit_done(task)


class Checkpoint(Hook):
    """Save the STATE to ``out`` at every boundary (:meth:`~.state.System.save`: atomic)."""

    def __init__(self, out):
        self.out = Path(out)

    def boundary(self, system) -> None:
        system.save(self.out)


class ProgressBar(Hook):
    """One progress bar per visit: children trained, and the best path's accuracy, score and size."""

    def __init__(self):
        self.bar = None

    def visit_started(self, task: str, round_: int, rounds: int, done: int, total: int) -> None:
        from mutask.progress import bar

        self.bar = bar(total=total, initial=done, desc=f"round {round_ + 1}/{rounds} {task}", unit="child", leave=True)

    def child_done(self) -> None:
        self.bar.update(1)

    def generation_done(self, generation: int, best) -> None:
        if best is not None:
            m = best.metrics
            self.bar.set_postfix(gen=generation, best_acc=f"{m['val_accuracy']:.3f}", score=f"{m['score']:.3f}", params=f"{m['params'] / 1e3:.0f}k")

    def visit_done(self, task: str) -> None:
        self.bar.close()


def standard_hooks(out=None, show_progress: bool = True) -> list[Hook]:
    """What ``mutask evolve`` plugs in: a checkpoint in ``out`` (when given), a progress bar (when shown)."""
    return ([Checkpoint(out)] if out is not None else []) + ([ProgressBar()] if show_progress else [])
