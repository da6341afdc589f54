"""``export/FORMAT.md``, generated: the manifest's schema from the pydantic model, the rest prose.

The manifest model (:mod:`export.manifest`, every field's ``description``) is the only source of
the schema; this module renders it as tables and wraps them in the prose that is not schema
(file layout, the weights file, the graphs, preprocessing, how segments are cut, hashing,
reading, versioning), whose constants it reads from the modules that define them. A test
fails when the committed file differs from what :func:`render` writes. Torch-free.

    python -m mutask.export.format          # rewrite export/FORMAT.md
    python -m mutask.export.format --check  # exit 1 when it is out of date
"""

from __future__ import annotations

import json
import pathlib
import sys

from .chain import ATOL, MIN_ARGMAX_AGREEMENT
from .manifest import FORMAT_VERSION, INLINE_LIMIT, MANIFEST, SEGMENT_INPUT, SEGMENT_OUTPUT, TASK_INPUT, TASK_OUTPUT, WEIGHTS, Manifest

PATH = pathlib.Path(__file__).with_name("FORMAT.md")
# the placeholder a map field's keys get in section titles (`tasks.<task>`)
KEYS = {"graphs": "<file>", "tasks": "<task>", "components": "<cid>", "segments": "<sid>"}


# ----------------------------------------------------------------------------- schema tables


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rules(p: dict) -> list[str]:
    out = []
    for key, fmt in (("minimum", ">= {}"), ("exclusiveMinimum", "> {}"), ("maximum", "<= {}"), ("exclusiveMaximum", "< {}")):
        if key in p:
            out.append(fmt.format(p[key]))
    if "minItems" in p and "prefixItems" not in p:
        out.append(f"at least {p['minItems']}")
    if "minProperties" in p:
        out.append(f"at least {p['minProperties']} entry")
    if "pattern" in p:
        out.append(f"matching `{p['pattern']}`")
    return out


def _ref(p: dict) -> str | None:
    if "$ref" in p:
        return p["$ref"].rsplit("/", 1)[-1]
    if len(p.get("allOf", [])) == 1 and "$ref" in p["allOf"][0]:
        return p["allOf"][0]["$ref"].rsplit("/", 1)[-1]
    return None


def _type(p: dict) -> str:
    """A JSON-schema property as words: ``list of string (at least 1)``, ``integer (> 0)``."""
    name = _ref(p)
    if name:
        return f"{name} (below)"
    if "anyOf" in p:
        return " or ".join(_type(x) for x in p["anyOf"])
    if "const" in p:
        return f"`{json.dumps(p['const'])}`"
    if "enum" in p:
        return " or ".join(f"`{json.dumps(v)}`" for v in p["enum"])
    t = p.get("type")
    if t == "array" and "prefixItems" in p:
        kinds = [_type(x) for x in p["prefixItems"]]
        base = f"{len(kinds)} x {kinds[0]}" if len(set(kinds)) == 1 else f"[{', '.join(kinds)}]"
    elif t == "array":
        base = f"list of {_type(p.get('items', {}))}"
    elif t == "object":
        ap = p.get("additionalProperties")
        base = f"map of string to {_type(ap)}" if isinstance(ap, dict) else "JSON object"
    else:
        base = t or "any JSON value"
    rules = _rules(p)
    return f"{base} ({', '.join(rules)})" if rules else base


def _sections(schema: dict) -> list[tuple[str, str, dict]]:
    """(where it sits in the manifest, model name, its schema) for the manifest and every model
    it refers to, depth first in field order."""
    defs = schema.get("$defs", {})
    out, seen = [], set()

    def visit(name: str, model: dict, where: str) -> None:
        if name in seen:
            return
        seen.add(name)
        out.append((where, name, model))
        for field, p in model.get("properties", {}).items():
            for sub, suffix in ((p, ""), (p.get("additionalProperties") if isinstance(p.get("additionalProperties"), dict) else {}, f".{KEYS.get(field, '<key>')}")):
                ref = _ref(sub or {})
                if ref:
                    visit(ref, defs[ref], f"{where}.{field}{suffix}" if where else f"{field}{suffix}")

    visit(schema["title"], schema, "")
    return out


def schema_tables(model=Manifest) -> str:
    """One table per model of the manifest: field, type and rules, required or default, meaning."""
    parts = []
    for where, name, m in _sections(model.model_json_schema()):
        title = f"### {name}" + (f": `{where}`" if where else f": the document ({MANIFEST})")
        doc = " ".join(m.get("description", "").split())
        rows = ["| field | type | required | meaning |", "|---|---|---|---|"]
        required = set(m.get("required", []))
        for field, p in m.get("properties", {}).items():
            need = "yes" if field in required else f"default `{json.dumps(p.get('default'))}`"
            rows.append(f"| `{field}` | {_cell(_type(p))} | {need} | {_cell(p.get('description', ''))} |")
        parts.append("\n".join([title, "", doc, "", *rows]) if doc else "\n".join([title, "", *rows]))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- the document


def render() -> str:
    """FORMAT.md's text."""
    return f"""# mutask artifact format, version {FORMAT_VERSION}

<!-- Generated by `python -m mutask.export.format` from export/manifest.py and export/format.py; do not edit. -->

`mutask export STATE --out ART` writes a directory that any ONNX Runtime user can run and
that the torch-free server (`mutask serve`) loads. Every weight is on disk exactly once.

```
ART/
  {MANIFEST:<21}  the contract below (UTF-8 JSON)
  {WEIGHTS:<21}  every unique tensor of the system, once
  task.<task>.onnx       one graph per task:    {TASK_INPUT} -> {TASK_OUTPUT}
  segment.<sid>.onnx     one graph per segment: image | hidden -> hidden | logits
```

All files sit in one flat directory on purpose: ONNX external data names its file by a
`location` relative to the graph file's own directory (ONNX Runtime refuses locations that
leave it: "External data path escapes model directory"), so a graph can only name `{WEIGHTS}`
plainly if both share a directory. Copying one `task.<task>.onnx` together with `{WEIGHTS}` to
any directory is a complete, runnable model.

## {WEIGHTS}

A standard [safetensors](https://github.com/huggingface/safetensors) file: 8 bytes N
(little-endian u64), an N-byte JSON header, then the tensor bytes.

- Tensors are deduplicated by **content**: two tensors with the same dtype, shape and bytes
  (sha256 over `dtype | shape | bytes`) are stored once, e.g. a clone that was never trained.
- Tensor names are `<component id>/<tensor name in the component>` of the first component that
  holds the bytes, e.g. `c12/attn.qkv.weight`.
- `__metadata__`: `"format": "mutask-weights"`, `"format_version"` (the artifact's, as text:
  `"{FORMAT_VERSION}"`), and one entry per tensor name whose value lists the ids of every component
  that uses those bytes, comma-separated (`"c3/weight": "c3,c41"`).

## ONNX graphs

The default ONNX domain only, at the exporter's default opset, produced by
`torch.onnx.export(dynamo=True)`. Input and output names are fixed (`export/manifest.py`:
`TASK_INPUT`, `TASK_OUTPUT`, `SEGMENT_INPUT`, `SEGMENT_OUTPUT`).

| graph   | input | output |
|---------|-------|--------|
| task    | `{TASK_INPUT}`: float32 `(batch, 3, S, S)`, preprocessed | `{TASK_OUTPUT}`: float32 `(batch, C)` |
| segment | `{SEGMENT_INPUT}`: the image as above, or hidden states float32 `(batch, T, D)` | `{SEGMENT_OUTPUT}`: hidden states `(batch, T', D)`, or logits `(batch, C)` |

`batch` is a dynamic axis; every other dimension is fixed (recorded as `input_shape` /
`output_shape` in the manifest, with `"batch"` for the dynamic axis).

**Weights are external data.** Every initializer that is a component tensor has
`data_location = EXTERNAL` and `external_data` = `location: "{WEIGHTS}"`, `offset`, `length`,
where `offset` is absolute in the file (`8 + N + begin` of the tensor's `data_offsets`) and
`length = end - begin`. Each reference covers exactly one tensor of the weights file.
Initializers are the original parameter tensors: anything derived from them (a transposed
weight, a position embedding resampled to another image size) is computed inside the graph.
Only small constants (shapes, scalars; at most {INLINE_LIMIT} bytes each) are stored inline.

A task's graph is its segment chain composed into one graph (value and initializer names
prefixed by segment id, each segment's output wired to the next one's input; the initializers'
external-data references are copied unchanged), so running its segments one after another
gives the same logits (checked at export and by `--verify-only`: `export/chain.py`).

## {MANIFEST}

Export builds a `Manifest` (`export/manifest.py`) and writes it as JSON (`sealed_json`, `export/build.py`);
every reader parses the file with `Manifest.load()`, which checks every field below and every
cross reference (a task's chain, segment parents, components, graph files). No field outside
the schema is allowed. The tables are generated from the model.

{schema_tables()}

### Preprocessing, step by step

`tasks.<task>.preprocessing` is the contract of `mutask/preprocessing.py` (`Preprocessing`), the
one implementation that evaluation, training, the export's parity check and the server all call:

1. decode, apply EXIF orientation, convert to RGB (grayscale tiled, alpha dropped);
2. resize to `image_size` x `image_size` with Pillow's `resize` filter, `"bilinear"` or
   `"bicubic"` (skipped when already that size);
3. per channel c, float32 `(pixel / 255 - mean[c]) / std[c]`, computed as
   `pixel * scale[c] + offset[c]` in float32 with `scale = float32(1 / (255 * std))` and
   `offset = float32(-mean / std)` (both computed in float64); channels first.

`mean` and `std` are in [0, 1] pixel units (timm's convention): the root's own. A `timm:NAME`
root takes them and the filter from timm's data config for the model; timm's centre crop is
not part of the contract (images are resized whole). Roots from `mutask pretrain` use
mean = std = 0.5 with bilinear resizing. Every task of an artifact has the root's mean, std
and filter, at its own `image_size`.

### Segments: how the paths are cut

Each path step is keyed by (component id, the path's image size). Every step works on each
image's rows independently, so rows of different tasks can go through a shared step in one
batch even when they reached it through different (cloned) earlier steps. The tasks' step
sequences form a directed acyclic graph; a segment is a maximal run of steps
`u1 -> ... -> uk` where every task through `u(i)` goes next to `u(i+1)` and every task through
`u(i+1)` comes from `u(i)`: the same tasks pass the whole run, and each step (so each component
at one image size) is in exactly one segment. Segment ids `s0, s1, ...` are in a topological
order: a segment comes after all of its `parents`. A segment with `input: "image"` has no
parents; the others take, for each task, the output of that task's previous segment in its
chain (one of `parents`). A server can run each segment once over the rows of every task that
passes through it. A component that paths use at two image sizes is in two segments; its
tensors are still stored once.

### Integrity

`weights_sha256` and `graphs` bind every other file to the manifest; `manifest_sha256` binds
the manifest itself: it is the sha256 of the manifest's JSON in canonical form (keys sorted,
separators `,` and `:`, UTF-8, no escaping of non-ASCII) with `manifest_sha256` set to `""`. A
reader recomputes it from the file as parsed and refuses a manifest whose digest differs, so an
edit after export (a label, the preprocessing, a metric, an image size) is refused before
anything is served. It detects edits, not an adversary who recomputes the digest: that needs a
signature.

## Guarantees checked at export (nothing is written when one fails)

- per task: ONNX Runtime (CPU) on the task graph against the PyTorch path on a sample of the
  task's test split: max |logit difference| <= {ATOL:g} x max(1, the largest |logit|) and the same arg-max on >= {MIN_ARGMAX_AGREEMENT:.1%}
  of examples;
- per task: its segment chain against its task graph, same bounds;
- the reader below accepts the result. The directory appears atomically (built next to ART,
  then renamed); an existing ART is replaced only with `--force`.

## Reading (no torch)

The reader is `load_artifact(ART)` in `export/artifact.py` (it needs `onnx` to parse the
graphs, not torch); it parses `{MANIFEST}` with the schema above and returns an `Artifact`
whose `.manifest` is the typed `Manifest`. It refuses, with an `ArtifactError` naming the file
and the fix (`mutask export STATE --out ART --force`): a missing directory, manifest or file;
another `format_version`; a manifest field that is missing, of the wrong type or unknown (the
message names the field, e.g. `tasks.a.num_classes`); a broken cross reference; a weights file
of the wrong size (truncated) or sha256; a graph whose sha256 differs; an external-data
reference that is not exactly one tensor of the weights file. `load_artifact(ART,
verify=False)` skips the hashing and reference checks. `mutask export --verify-only ART` also
runs every task graph against its segment chain in ONNX Runtime on the task's test images (or
random inputs, said so, when the data cannot be loaded).

## Versioning

`format_version` changes whenever a reader of the previous version would misread an artifact.
Readers refuse versions they do not know; re-export with `mutask export STATE --out ART --force`.
Version 1 cut the paths as a prefix tree (`"parent"`: one segment or null); version 2 had no
`manifest_sha256`; version 3 recorded a fixed `scale` / `offset` (`pixel / 127.5 - 1`) and
bilinear resizing whatever the root.
"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        if PATH.read_text(encoding="utf-8") != text:
            print(f"{PATH} is out of date: run `python -m mutask.export.format`", file=sys.stderr)
            return 1
        return 0
    PATH.write_text(text, encoding="utf-8")
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
