"""Pre-packed weights, one copy for every session: ONNX Runtime's own optimized models, pooled.

ONNX Runtime runs a MatMul fastest from a weight *pre-packed* for its kernels, and every session
packs its own copy (sharing packs is not in the Python API; no pre-packing costs up to 2x). So
each graph is optimized once at engine start with
``session.save_external_prepacked_constant_initializers`` (initializers and their packs to an
external data file), all those blobs pooled into one file, each distinct blob once, and the
models pointed at it: sessions load them unoptimized and map the pool, every weight in memory
once. The pool is made for this CPU at each start and deleted once mapped. CPU only.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
import shutil
import tempfile

log = logging.getLogger("mutask.serving")

POOL_FILE = "weights.pool"
ALIGN = 4096  # every blob starts on a page: ONNX Runtime maps each one on its own
# small initializers (shapes, biases) stay in the model: shape inference reads them at load
SAVE_CONFIG = {
    "session.save_external_prepacked_constant_initializers": "1",
    "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
}


class PrepackedPool:
    """Optimized, pre-packed copies of graphs, all reading one pool file: ``add`` each graph
    (with the session options it will run with), ``finish()`` for {key: pooled model path},
    ``close()`` once every session is created. ``blob_bytes`` (the graphs' data files in all)
    against ``pool_bytes`` says what pooling saved."""

    def __init__(self):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="mutask-prepacked-"))
        self._models: dict[str, pathlib.Path] = {}
        self.blob_bytes = 0
        self.pool_bytes = 0
        self.references = 0  # blobs the models read (weights and packs)
        self.placed = 0  # distinct blobs in the pool

    def add(self, key: str, graph_path, options, providers) -> None:
        import onnxruntime as ort

        stem = f"g{len(self._models)}"
        options.optimized_model_filepath = str(self.dir / f"{stem}.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{stem}.data")
        for k, v in SAVE_CONFIG.items():
            options.add_session_config_entry(k, v)
        ort.InferenceSession(str(graph_path), options, providers=providers)  # writes the optimized model
        if not (self.dir / f"{stem}.onnx").exists():
            raise RuntimeError(f"onnxruntime {ort.__version__} wrote no optimized model for {graph_path}")
        self._models[key] = self.dir / f"{stem}.onnx"

    def finish(self) -> dict[str, pathlib.Path]:
        """Pool every data file's blobs (each distinct one once) and point the models at it."""
        import onnx

        offsets: dict[bytes, int] = {}  # blob digest -> offset in the pool
        with open(self.dir / POOL_FILE, "wb") as pool:

            def place(blob: bytes) -> int:
                digest = hashlib.blake2b(blob, digest_size=20).digest()
                at = offsets.get(digest)
                if at is None:
                    pool.write(b"\0" * (-pool.tell() % ALIGN))
                    at = offsets[digest] = pool.tell()
                    pool.write(blob)
                    self.placed += 1
                self.references += 1
                return at

            for path in self._models.values():
                model = onnx.load(str(path), load_external_data=False)
                data: dict[str, bytes] = {}
                for tensor in model.graph.initializer:
                    if tensor.data_location != onnx.TensorProto.EXTERNAL:
                        continue
                    entries = {e.key: e for e in tensor.external_data}
                    name = entries["location"].value
                    if name not in data:
                        data[name] = (path.parent / name).read_bytes()
                    blob = data[name]
                    off, length = int(entries["offset"].value), int(entries["length"].value)
                    entries["offset"].value = str(place(blob[off : off + length]))
                    entries["location"].value = POOL_FILE
                    for k, e in entries.items():  # "prepacked_i": "KERNEL+HASH|offset;length;..."
                        if k.startswith("prepacked"):
                            kernel, _, where = e.value.partition("|")
                            p_off, p_len, *rest = where.split(";")
                            p_at = place(blob[int(p_off) : int(p_off) + int(p_len)])
                            e.value = f"{kernel}|" + ";".join([str(p_at), p_len, *rest])
                self.blob_bytes += sum(len(b) for b in data.values())
                onnx.save(model, str(path))
                for name in data:
                    (path.parent / name).unlink()
            self.pool_bytes = pool.tell()
        return dict(self._models)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

