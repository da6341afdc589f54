"""mutask: evolve one pretrained network into a multitask system (muNet), export it, serve it.

Four stages, imported one way only: ``mutask.evolve`` (torch) -> ``mutask.export`` (torch to
write, torch-free to read) -> ``mutask.serving`` (no torch); ``mutask.benchmarks`` measures
them. This package holds what they share, the CLI and the demo. The stages are the top-level
folders ``evolve/`` ... ``benchmarks/``: a wheel installs them inside this package
(pyproject.toml's ``package-dir``); a source checkout or a Bento's ``src/`` has them beside it,
so there the package also looks beside itself.
"""

import os as _os

__version__ = "0.1.0"

_here = _os.path.dirname(_os.path.abspath(__file__))
_beside = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "serving")) and _os.path.isfile(_os.path.join(_beside, "serving", "__init__.py")):
    __path__.append(_beside)  # noqa: F821 (the package's own __path__)
