"""``mutask report``: per-task accuracy and parameters, sharing, and a picture of the system."""

from __future__ import annotations

from pathlib import Path

from .state import System


def report(system: System) -> dict:
    """The JSON document of ``mutask report --json``."""
    s = system
    tasks = {}
    for task in s.best:
        p = s.best_path(task)
        shares = {}
        for cid in p.components:
            others = sorted(s.store[cid].locks - {task})
            if others:
                shares[cid] = others
        tasks[task] = {
            "val_accuracy": p.metrics.get("val_accuracy"),
            "test_accuracy": p.metrics.get("test_accuracy"),
            "params": s.path_params(p.components),
            "accounted_params": s.accounted_params(p.components, task),
            "components": list(p.components),
            "component_names": [s.store[c].name for c in p.components],
            "shared_with": shares,
            "num_classes": s.tasks.get(task, {}).get("num_classes"),
            "image_size": p.image_size,
            "hparams": p.hparams,
        }
    n = max(1, len(tasks))
    return {
        "root": s.root.source,
        "root_params": s.root_params,
        "system_params": s.system_params(),
        "params_per_task": sum(t["accounted_params"] for t in tasks.values()) / n,
        "complete": s.progress is None,
        "children_trained": len(s.history),
        "tasks": tasks,
    }


def format_table(doc: dict) -> str:
    lines = [
        f"root {doc['root']}: {doc['root_params']:,} params; system {doc['system_params']:,} unique params; "
        f"{doc['params_per_task']:,.0f} params per task; {doc['children_trained']} children trained"
        + ("" if doc["complete"] else " (run incomplete: --resume it)"),
        "",
        f"{'task':<16} {'val acc':>8} {'test acc':>8} {'params':>10} {'accounted':>10}  shares",
    ]
    for name, t in doc["tasks"].items():
        shared = sorted({o for others in t["shared_with"].values() for o in others})
        lines.append(
            f"{name:<16} {t['val_accuracy']:>8.3f} {t['test_accuracy'] if t['test_accuracy'] is not None else float('nan'):>8.3f} "
            f"{t['params']:>10,} {t['accounted_params']:>10,.0f}  {', '.join(shared) if shared else '-'}"
        )
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e3:.0f}k" if n >= 10_000 else f"{n / 1e3:.1f}k" if n >= 1000 else str(n)


def draw_system(system: System, out_png) -> Path:
    """One column per task, one row per layer; each component is a box spanning the tasks
    that share it (grey: frozen root components; colours: components trained for a task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    s = system
    tasks = list(s.best)
    layers = sorted({s.store[c].name for t in tasks for c in s.best_path(t).components}, key=s.root.order)
    cmap = plt.get_cmap("tab20")
    owner_colour = {t: cmap(i % 20) for i, t in enumerate(tasks)}
    fig_w, fig_h = 1.2 + 1.3 * max(1, len(tasks)), 0.9 + 0.42 * len(layers)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=110)
    for row, layer in enumerate(layers):
        y = len(layers) - 1 - row
        col = 0
        while col < len(tasks):
            comp = next((c for c in s.best_path(tasks[col]).components if s.store[c].name == layer), None)
            if comp is None:
                col += 1
                continue
            end = col
            while end + 1 < len(tasks) and comp in s.best_path(tasks[end + 1]).components:
                end += 1
            c = s.store[comp]
            first_owner = next((t for t in tasks if t in c.locks), tasks[col])
            colour = (0.82, 0.82, 0.82, 1) if c.root else owner_colour[first_owner]
            ax.add_patch(Rectangle((col + 0.06, y + 0.1), end - col + 0.88, 0.8, facecolor=colour, edgecolor="black", linewidth=0.6))
            label = comp if c.root else f"{comp} ({_count(c.num_params)})"
            ax.text((col + end + 1) / 2, y + 0.5, label, ha="center", va="center", fontsize=7)
            col = end + 1
    ax.set_xlim(0, len(tasks))
    ax.set_ylim(0, len(layers))
    ax.set_xticks([i + 0.5 for i in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=30, ha="right", fontsize=8)
    ax.set_yticks([len(layers) - 1 - i + 0.5 for i in range(len(layers))])
    ax.set_yticklabels(layers, fontsize=8)
    ax.set_title(f"mutask system: {s.system_params():,} unique params, {len(tasks)} tasks\n(grey: frozen root components; colour: trained for a task)", fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
