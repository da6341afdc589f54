"""The root registry (after timm's model registry): families register themselves, ``--root``
resolves through them.

- :func:`register_root` (a class decorator) adds a root family (a :class:`~.base.Root`
  subclass); :func:`root_for` gives a ready timm module to the family that takes it, or raises
  :class:`MutaskError` with the reason.
- :func:`register_names` lets a module claim short ``--root`` names (``efficientnet-lite0``)
  with a loader that returns ``(spec, module)``.
- :func:`load_root` resolves ``--root``: a claimed name, ``timm:NAME`` (timm builds it, the
  family that takes the module cuts it), or a directory ``mutask pretrain`` wrote
  (``config.json`` + ``model.safetensors``), or a spec saved in a STATE.

``spec`` rebuilds the architecture (``{"timm_model": NAME, "kwargs": {...}}``,
:func:`build_model`); the weights travel in the STATE as the root's components.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from torch import nn

from mutask.errors import MutaskError

from .base import Root, timm_preprocessing

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

_FAMILIES: list[type[Root]] = []
_NAMES: dict[str, Callable[[str], tuple[dict, nn.Module]]] = {}


def register_root(cls: type[Root]) -> type[Root]:
    """Class decorator: register a root family (asked in registration order)."""
    if cls not in _FAMILIES:
        _FAMILIES.append(cls)
    return cls


def register_names(names, loader: Callable[[str], tuple[dict, nn.Module]]) -> None:
    """Claim the short ``--root`` ``names``; ``loader(name)`` returns ``(spec, module)``."""
    for name in names:
        _NAMES[name] = loader


def supported() -> str:
    """What mutask takes as a root, one example each (for error messages)."""
    items = [cls.supported for cls in _FAMILIES]
    return ", ".join(items[:-1]) + (" or " if len(items) > 1 else "") + items[-1]


def build_model(spec: dict) -> nn.Module:
    """A timm model from a root spec: ``{"timm_model": NAME, "kwargs": {...}}`` (a family may
    build a spec itself, e.g. ``timm_model`` "VisionTransformer" from the class's kwargs)."""
    import timm

    for cls in _FAMILIES:
        module = cls.build(spec)
        if module is not None:
            return module
    name, kwargs = spec["timm_model"], dict(spec.get("kwargs", {}))
    try:
        return timm.create_model(name, pretrained=bool(spec.get("pretrained", False)), **kwargs)
    except RuntimeError as e:  # unknown model names
        raise MutaskError(f"timm cannot build {name!r}: {e}. Pick a name from timm.list_models(), e.g. vit_tiny_patch16_224 or resnet18.") from e


def root_for(spec: dict, module: nn.Module, source: str) -> Root:
    """The root of the family that takes ``module``; :class:`MutaskError` naming why none does."""
    for cls in _FAMILIES:
        problems = cls.problems(module)
        if problems is None:
            continue
        if not problems:
            return cls(spec, module, source)
        raise MutaskError(f"root {source!r} is not supported: {'; '.join(problems)}. {cls.fix or f'mutask takes {supported()}'}.")
    kinds = [cls.kind for cls in _FAMILIES]
    kinds = ", ".join(kinds[:-1]) + " or " + kinds[-1] if len(kinds) > 1 else kinds[0]
    raise MutaskError(f"root {source!r} is not supported: it is a {type(module).__name__}, not a {kinds}. mutask takes {supported()}.")


def load_root(spec_or_arg: str | dict, pretrained: bool = False) -> Root:
    """``DIR`` (a ``mutask pretrain`` output), a claimed short name, ``timm:NAME``, or a saved spec dict."""
    if isinstance(spec_or_arg, dict):
        spec = spec_or_arg
        if "dir" in spec:
            return load_root(spec["dir"])
        return root_for(spec, build_model(spec), f"timm:{spec['timm_model']}")
    arg = str(spec_or_arg)
    if arg in _NAMES:
        spec, module = _NAMES[arg](arg)
        return root_for(spec, module, arg)
    if arg.startswith("timm:"):
        return _load_timm(arg[5:], pretrained)
    return load_root_dir(arg)


def _load_timm(name: str, pretrained: bool) -> Root:
    import timm

    arg = f"timm:{name}"
    if not timm.is_model(name):
        raise MutaskError(f"unknown timm model {name!r}. Pick one of timm.list_models(): {supported()}.")
    spec = {"timm_model": name, "kwargs": {}, "pretrained": pretrained}
    try:
        model = build_model(spec)
    except MutaskError:
        raise
    except Exception as e:  # network or cache problems of timm's own loading
        raise MutaskError(f"timm could not load {name!r} (pretrained={pretrained}): {e}. Without network, drop --pretrained or use a local root directory.") from e
    spec["pretrained"] = False  # the weights now travel inside the state, not via timm
    spec["preprocessing"] = timm_preprocessing(model, arg)
    return root_for(spec, model, arg)


def load_root_dir(path: str | os.PathLike) -> Root:
    """The root in a directory ``mutask pretrain`` wrote."""
    from safetensors.torch import load_file

    d = Path(path)
    cfg, weights = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not d.is_dir():
        raise MutaskError(f"root directory {str(d)!r} does not exist. Give a directory written by `mutask pretrain --out DIR`, or timm:NAME.")
    if not cfg.is_file() or not weights.is_file():
        raise MutaskError(f"root directory {str(d)!r} needs {CONFIG_FILE} and {WEIGHTS_FILE} (what `mutask pretrain --out DIR` writes).")
    try:
        spec = json.loads(cfg.read_text())
        model = build_model(spec)
        model.load_state_dict(load_file(str(weights)))
    except MutaskError:
        raise
    except Exception as e:
        raise MutaskError(f"root directory {str(d)!r} is unusable ({e}). Re-create it with `mutask pretrain --out {d}`.") from e
    spec = dict(spec)
    spec["dir"] = str(d.resolve())
    return root_for(spec, model, str(d))


def save_root_dir(model: nn.Module, spec: dict, out: str | os.PathLike) -> None:
    """Write ``config.json`` + ``model.safetensors`` atomically (a temp dir renamed into place)."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(spec, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
