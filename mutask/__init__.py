"""mutask: evolve one pretrained ViT into a multitask system (muNet), export it, serve it.

The stages live in top-level packages, imported in one direction only:
``evolve`` (torch) -> ``export`` (torch to write, torch-free to read) -> ``serving`` (no torch).
This package holds what all of them share (errors, cache location) and the CLI.
"""

__version__ = "0.1.0"
