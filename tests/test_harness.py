"""benchmarks.harness: interleaving order, the paired-ratio interval, the record's machine line."""

import json

import numpy as np

from mutask.benchmarks import harness


def test_interleave_alternates_the_order():
    calls = []
    runs = harness.interleave({"a": lambda i: calls.append(("a", i)) or 1.0, "b": lambda i: calls.append(("b", i)) or 2.0}, 3)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert runs == {"a": [1.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0]}


def test_times_warms_up_untimed():
    calls = []
    out = harness.times(lambda: calls.append(1), 3, warmup=2)
    assert len(calls) == 5 and len(out) == 3 and all(t >= 0 for t in out)


def test_paired_ratio_interval_contains_the_true_ratio():
    rng = np.random.default_rng(1)
    drift = rng.uniform(0.5, 2.0, 12)  # the shared machine's speed, the same for both in a pair
    a = 100 * drift * rng.normal(1, 0.03, 12)
    b = 1.3 * 100 * drift * rng.normal(1, 0.03, 12)
    r = harness.paired_ratio(list(b), list(a))
    assert r["pairs"] == 12 and r["low"] < 1.3 < r["high"] and r["high"] - r["low"] < 0.1
    assert harness.paired_ratio(list(b[:3]), list(a[:3]))["low"] is None  # 3 pairs: no interval
    assert "no interval" in harness.fmt_ratio(harness.paired_ratio([2.0] * 3, [1.0] * 3))


def test_record_names_the_cpu(tmp_path):
    j, md = harness.write_record("x", {"benchmark": "x"}, "| a |\n|---|", tmp_path)
    m = json.loads(j.read_text())["machine"]
    assert m["cpu_model"] and m["cores"] >= 1
    line = md.read_text().splitlines()[-1]
    assert line.startswith(f"Machine: {m['cpu_model']}, {m['cores']} cores") and "shared machine: other work ran" in line
    old = {"processor": "AMD EPYC", "cpu_count": 16, "cuda": "NVIDIA H200", "platform": "Linux", "python": "3.12.3", "date": "d"}
    assert harness.machine_line(old).startswith("Machine: AMD EPYC, 16 cores; GPU NVIDIA H200; Linux")


def test_rerender_replaces_the_machine_line(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"machine": {"processor": "AMD EPYC", "cpu_count": 2, "date": "d"}}))
    (tmp_path / "r.md").write_text("| a |\n\nMachine:  (2 cores).\n\nMachine: old footer\n")
    text = harness.rerender("r", tmp_path).read_text()
    assert text.count("Machine:") == 1 and "Machine: AMD EPYC, 2 cores" in text and text.startswith("| a |")
