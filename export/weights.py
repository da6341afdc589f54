"""The artifact's ``weights.safetensors``: every unique tensor of the exported components, once.

Tensors are deduplicated by content (:func:`content_key`: sha256 of dtype, shape and bytes),
so an unchanged clone costs nothing. A tensor is stored under ``<component id>/<tensor name>``
of the first component that holds its bytes; the header's metadata lists, per stored tensor,
every component that uses it. :func:`write_weights` returns where each unique tensor's bytes
lie in the file (what the graphs' external-data references point at) and, per component, its
tensor map and content hash (what the manifest records).
"""

from __future__ import annotations

import hashlib
import pathlib
from dataclasses import dataclass

import numpy as np
import torch

from mutask.errors import MutaskError

from .artifact import read_safetensors_header
from .manifest import FORMAT_VERSION

__all__ = ["WeightsFile", "content_key", "write_weights"]


def content_key(arr: np.ndarray) -> str:
    """sha256 of dtype, shape and bytes: equal keys mean interchangeable tensors."""
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{arr.dtype.str}|{tuple(int(s) for s in arr.shape)}|".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy of a component tensor (bfloat16 is refused: ONNX Runtime's CPU
    provider and numpy lack it)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        raise MutaskError("bfloat16 components cannot be exported (ONNX Runtime's CPU provider and numpy lack it); convert the STATE to float32.")
    return t.numpy()


@dataclass(frozen=True)
class WeightsFile:
    """What :func:`write_weights` wrote.

    ``byte_ranges``: content key -> (absolute offset, length) of that tensor in the file;
    ``tensor_maps``: component id -> {tensor name in the component: tensor name in the file};
    ``component_sha256``: component id -> sha256 over its (tensor name, content key) lines;
    ``unique_bytes``: the tensor bytes in the file (the header excluded)."""

    path: pathlib.Path
    byte_ranges: dict[str, tuple[int, int]]
    tensor_maps: dict[str, dict[str, str]]
    component_sha256: dict[str, str]
    unique_bytes: int


def write_weights(modules: dict[str, torch.nn.Module], path) -> WeightsFile:
    """Write every unique tensor of ``modules`` (component id -> module, in export order) to
    the safetensors file ``path``."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    unique: dict[str, tuple[str, np.ndarray]] = {}  # content key -> (name in the file, array)
    users: dict[str, list[str]] = {}  # name in the file -> component ids
    tensor_maps: dict[str, dict[str, str]] = {}
    component_sha256: dict[str, str] = {}
    for cid, module in modules.items():
        tmap, h = {}, hashlib.sha256()
        for name, t in module.state_dict().items():
            arr = to_numpy(t)
            key = content_key(arr)
            if key not in unique:
                unique[key] = (f"{cid}/{name}", arr)
            stored = unique[key][0]
            tmap[name] = stored
            if cid not in users.setdefault(stored, []):
                users[stored].append(cid)
            h.update(f"{name}\0{key}\n".encode())
        tensor_maps[cid], component_sha256[cid] = tmap, h.hexdigest()

    metadata = {"format": "mutask-weights", "format_version": str(FORMAT_VERSION)}
    metadata.update({stored: ",".join(cids) for stored, cids in users.items()})
    save_file({stored: arr for stored, arr in unique.values()}, str(path), metadata=metadata)
    start, header = read_safetensors_header(path)
    byte_ranges = {}
    for key, (stored, _) in unique.items():
        begin, end = header[stored]["data_offsets"]
        byte_ranges[key] = (start + begin, end - begin)
    return WeightsFile(
        path=path,
        byte_ranges=byte_ranges,
        tensor_maps=tensor_maps,
        component_sha256=component_sha256,
        unique_bytes=sum(arr.nbytes for _, arr in unique.values()),
    )
