"""mutask: evolve one pretrained network into a multitask system (muNet), export it, serve it.

One import name, four stages, imported in one direction only:
``mutask.evolve`` (torch) -> ``mutask.export`` (torch to write, torch-free to read) ->
``mutask.serving`` (no torch); ``mutask.benchmarks`` measures them. This package itself holds
what every stage shares (errors, the cache location, versioned JSON documents, the image
preprocessing contract), the CLI and the demo.

The stages live in the repository's top-level folders ``evolve/``, ``export/``, ``serving/``
and ``benchmarks/``; a wheel installs them inside this package (``package-dir`` in
pyproject.toml). A source checkout run without installing (``PYTHONPATH=.``, a Bento's
``src/``) has them beside this folder, so there the package also looks beside itself.
"""

import os as _os

__version__ = "0.1.0"

_here = _os.path.dirname(_os.path.abspath(__file__))
_beside = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "serving")) and _os.path.isfile(_os.path.join(_beside, "serving", "__init__.py")):
    __path__.append(_beside)  # noqa: F821 (the package's own __path__)
