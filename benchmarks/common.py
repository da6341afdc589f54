"""Kept for the benchmarks not yet on :mod:`benchmarks.harness`: the same names, delegated."""

from __future__ import annotations

from mutask.benchmarks.harness import RESULTS, machine, median, write_record as write  # noqa: F401


def serving_machine() -> dict:
    """:func:`harness.machine` plus ONNX Runtime's providers (torch is not used in serving)."""
    import onnxruntime

    return dict(machine(), onnxruntime_providers=onnxruntime.get_available_providers(), torch="not used (serving is torch-free)")
