"""Every weight of an artifact in memory once, shared by all of the engine's sessions.

:class:`WeightStore` reads ``weights.safetensors`` into one buffer and hands every session the
tensors its graph reads as ONNX Runtime initializers that point into that buffer
(``SessionOptions.add_initializer``), so a component used by several segments (at two image
sizes, say) or by several tasks is never copied per session. Three ONNX Runtime features would
make per-session copies and are turned off for these sessions (:data:`SHARED_WEIGHTS_CONFIG`,
:data:`SHARED_WEIGHTS_DISABLED_OPTIMIZERS`): pre-packing of MatMul weights, constant folding
(which folds the graphs' ``Transpose(weight)`` into a new tensor; without it ONNX Runtime fuses
the transpose into ``FusedMatMul``), and the NCHWc layout transformer (which re-lays out the
patch embedding's convolution weight). The cost is packing a weight matrix on each run.
On CUDA each session still copies the weights it reads to the GPU.
"""

from __future__ import annotations

import pathlib

import numpy as np

from mutask.export.artifact import external_refs, read_safetensors_header

from .sessions import EngineError

SHARED_WEIGHTS_CONFIG = {"session.disable_prepacking": "1"}
SHARED_WEIGHTS_DISABLED_OPTIMIZERS = ["ConstantFolding", "NchwcTransformer"]

# safetensors dtype -> numpy (the dtypes an export can hold that numpy has)
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


class WeightStore:
    """Every tensor of a ``weights.safetensors`` file, read into one buffer once.

    ``arrays[name]`` is a numpy view into that buffer and ``values[name]`` an ONNX Runtime
    ``OrtValue`` over the same memory (no copy); :meth:`bind` adds, to a graph's session
    options, the tensors its external-data initializers name (by their offset in the file)."""

    def __init__(self, path):
        import onnxruntime as ort

        start, header = read_safetensors_header(path)
        self.path = pathlib.Path(path)
        self.buffer = np.fromfile(path, dtype=np.uint8)
        self.arrays: dict[str, np.ndarray] = {}
        self._by_range: dict[tuple, str] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise EngineError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which the engine cannot hold (it serves {sorted(_DTYPES)})")
            b, e = info["data_offsets"]
            self.arrays[name] = self.buffer[start + b : start + e].view(dtype).reshape(info["shape"])
            self._by_range[(start + b, e - b)] = name
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(arr) for name, arr in self.arrays.items()}

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    def bind(self, so, graph_path: pathlib.Path) -> dict[str, str]:
        """Point every external initializer of ``graph_path`` at the store and switch off the
        optimizations that would copy them; returns {initializer name: tensor name}.
        :class:`EngineError` if an initializer is not one stored tensor."""
        bound = {}
        for ref in external_refs(graph_path.read_bytes()):
            if not ref["external"]:
                continue
            if ref["location"] != self.path.name:
                raise EngineError(f"{graph_path}: initializer {ref['name']!r} reads {ref['location']!r}, not {self.path.name}")
            name = self._by_range.get((ref["offset"], ref["length"]))
            if name is None:
                raise EngineError(f"{graph_path}: initializer {ref['name']!r} is not one tensor of {self.path}")
            so.add_initializer(ref["name"], self.values[name])
            bound[ref["name"]] = name
        for key, value in SHARED_WEIGHTS_CONFIG.items():
            so.add_session_config_entry(key, value)
        return bound
