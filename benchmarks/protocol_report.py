"""The quality protocol's record: paired statistics over seeds, the markdown tables, the picture.

Accuracies are reported in points (percentage points of test accuracy, 0-100). A mean over
seeds comes with a 95 % t-interval: mean +- t(0.975, n - 1) * sd / sqrt(n), n = seeds (none
for one seed). A paired difference is taken seed by seed (same data split, same evolution
seed), then averaged with its t-interval.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

# t(0.975, df) for df = 1..30; beyond, the normal quantile is close enough (within 2 %).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def interval(xs: list[float]) -> dict:
    """Mean, sd, n and the 95 % t-interval of ``xs`` (lo = hi = None for fewer than 2 values)."""
    n = len(xs)
    if n == 0:
        return {"mean": None, "sd": None, "n": 0, "lo": None, "hi": None}
    mean = statistics.fmean(xs)
    if n < 2:
        return {"mean": mean, "sd": None, "n": 1, "lo": None, "hi": None}
    sd = statistics.stdev(xs)
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "lo": mean - half, "hi": mean + half}


def ok(recs):
    return [r for r in recs if "failed" not in r and "skipped" not in r and r.get("tasks")]


def per_seed(recs: list[dict], name: str, tasks: list[str]) -> dict[int, dict]:
    """seed -> {task: test points, "avg": mean over tasks} for strategy ``name``."""
    out = {}
    for r in ok(recs):
        if r["name"] == name and all(t in r["tasks"] for t in tasks):
            acc = {t: 100 * r["tasks"][t]["test_accuracy"] for t in tasks}
            out[r["seed"]] = dict(acc, avg=statistics.fmean(acc.values()))
    return out


def summarize(recs: list[dict], tasks: list[str]) -> dict:
    names = list(dict.fromkeys(r["name"] for r in ok(recs)))
    summary = {}
    for name in names:
        rs = [r for r in ok(recs) if r["name"] == name]
        seeds = per_seed(recs, name, tasks)
        p = lambda key: statistics.fmean(statistics.fmean(r["tasks"][t]["params"][key] for t in tasks) for r in rs)  # noqa: E731
        summary[name] = {
            "kind": rs[0]["kind"],
            "engine": rs[0].get("engine"),
            "seeds": sorted(seeds),
            "avg_points": interval([v["avg"] for v in seeds.values()]),
            "task_points": {t: interval([v[t] for v in seeds.values()]) for t in tasks},
            "points_per_seed": {s: v["avg"] for s, v in sorted(seeds.items())},
            "params_per_task": {"accounted": p("accounted"), "unique_new": p("unique_new"), "path": p("path")},
            "unique_new_per_seed": {r["seed"]: statistics.fmean(r["tasks"][t]["params"]["unique_new"] for t in tasks) for r in rs},
            "system_params": statistics.fmean(r["system_params"] for r in rs),
            "train_images_per_task": rs[0]["train_images_per_task"],
            "wall_seconds_per_job": statistics.fmean(r["wall_seconds"] for r in rs),
            "scale_factor": rs[0].get("scale_factor"),
            "change": rs[0].get("change"), "change_flags": rs[0].get("change_flags"), "before": rs[0].get("before"),
        }
    return summary


def paired(recs: list[dict], tasks: list[str], a: str, b: str) -> dict:
    """``a`` minus ``b``, seed by seed (points), per task and on the average; 95 % t-intervals."""
    sa, sb = per_seed(recs, a, tasks), per_seed(recs, b, tasks)
    common = sorted(set(sa) & set(sb))
    return {"strategy": a, "against": b, "seeds": common, "avg": interval([sa[s]["avg"] - sb[s]["avg"] for s in common]),
            "tasks": {t: interval([sa[s][t] - sb[s][t] for s in common]) for t in tasks}}


def comparisons(recs: list[dict], tasks: list[str], summary: dict) -> tuple[str | None, list[dict]]:
    """The best baseline (highest mean average points, among baselines with the most seeds) and
    every muNet variant's paired differences against it and against fine-tuning; plus the
    cross-task-seed ablation (muNet s=1 minus muNet without seeds)."""
    baselines = {n: s for n, s in summary.items() if s["kind"] == "baseline" and s["avg_points"]["mean"] is not None}
    best = None
    if baselines:
        most = max(len(s["seeds"]) for s in baselines.values())
        best = max((n for n, s in baselines.items() if len(s["seeds"]) == most), key=lambda n: baselines[n]["avg_points"]["mean"])
    out = []
    for n, s in summary.items():
        if s["kind"] != "munet":
            continue
        for b in dict.fromkeys([best, "finetune"]):
            if b in summary:
                out.append(paired(recs, tasks, n, b))
    if "munet-s1" in summary and "munet-noseed" in summary:
        out.append(paired(recs, tasks, "munet-s1", "munet-noseed"))
    for n, s in summary.items():  # each method change against the same job without it: its before/after row
        if s.get("before") in summary:
            out.append(dict(paired(recs, tasks, n, s["before"]), change=s["change"]))
    return best, out


def fmt(iv: dict, signed: bool = False) -> str:
    if iv["mean"] is None:
        return "-"
    m = f"{iv['mean']:+.1f}" if signed else f"{iv['mean']:.1f}"
    return m if iv["lo"] is None else f"{m} [{iv['lo']:+.1f}, {iv['hi']:+.1f}]" if signed else f"{m} [{iv['lo']:.1f}, {iv['hi']:.1f}]"


def structure_text(st: dict) -> str:
    parts = [f"{st.get('frozen', 0)} frozen", f"{st.get('cloned', 0)} cloned"]
    if st.get("adapters"):
        parts.append(f"{st['adapters']} adapters" + (f" (w{st['adapter_width']} at {','.join(st['adapter_blocks'])})" if st.get("adapter_blocks") else ""))
    if st.get("lora_layers"):
        parts.append(f"LoRA on {st['lora_layers']} convs")
    if st.get("from_other_tasks"):
        parts.append(f"{st['from_other_tasks']} from other tasks")
    return ", ".join(parts) + f"; {st.get('image_size')} px, lr {st.get('lr')}"


def search_stats(r: dict) -> dict:
    """How a muNet job's search went: children, accepted, generations, mutated winners."""
    h = r.get("history", [])
    won = sum(1 for t in r["tasks"].values() if t["structure"]["parent"] not in (None, "root"))
    return {"children": len(h), "accepted": sum(1 for x in h if x["accepted"]), "mutated": sum(1 for x in h if not x["seed"]),
            "mutated_accepted": sum(1 for x in h if not x["seed"] and x["accepted"]),
            "generations_per_visit": max((x["generation"] for x in h), default=-1) + 1,
            "winners_not_from_root": won}


def markdown(meta: dict, summary: dict, best: str | None, comps: list[dict], recs: list[dict], tasks: list[str], planned: int) -> str:
    p = meta["protocol"]
    L = []
    done = len(ok(recs))
    L.append(f"# Quality protocol ({meta['preset']} preset): muNet against tuned baselines, matched compute, paired seeds\n")
    if done < planned:
        L.append(f"**Partial record: {done} of {planned} jobs finished.**\n")
    L.append(f"Root {p['root']} at {p['image_size']} px; tasks {', '.join(tasks)}"
             + (f" (skipped: {', '.join(f'{k}: {v}' for k, v in meta['tasks_skipped'].items())})" if meta.get("tasks_skipped") else "") + ".")
    img = next(iter(summary.values()))["train_images_per_task"] if summary else 0
    L.append(f"Matched compute: **{img:,} training images per task for every strategy** ({p['rounds']} rounds x {p['children']} children x "
             f"{p['steps']} steps x batch {p['batch_size']}; muNet counts every child, seeds included; each baseline trains "
             f"{p['lr_candidates']} distinct learning-rate candidates from the root, {p['rounds'] * p['children'] * p['steps'] // p['lr_candidates']} "
             f"steps each, and keeps the one with the best validation accuracy). Validation: {p['validations']} per child or candidate.")
    L.append("Learning-rate candidates: " + "; ".join(f"{k} {v}" for k, v in meta["lr_candidates"].items())
             + ". muNet searches its own (its lr list, one step per mutation, from 0.01, or from `--lr` where a method change sets it).")
    L.append("Engines: muNet and its ablation run `mutask evolve` (command line); the baselines are plain torch loops over the same data and "
             "preprocessing with mutask's trainer (mutask.benchmarks.protocol_baselines; LoRA through peft).")
    L.append(f"Seeds: {p['seeds']} paired seeds; seed N is the evolution / initialisation seed and the data-split seed of every strategy. "
             "Accuracies in **points** (test accuracy x 100); intervals are 95 % t-intervals over seeds. "
             f"Wall time: {meta.get('wall_seconds', 0):.0f} s for the whole run, {p['jobs']} jobs at a time.\n")
    L.append("## Accuracy and parameters per task\n")
    L.append("| strategy | seeds | avg points [95 % CI] | " + " | ".join(tasks) + " | accounted params/task | unique new params/task | system params | s/job |")
    L.append("|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|")
    for n, s in summary.items():
        L.append(f"| {n} | {len(s['seeds'])} | {fmt(s['avg_points'])} | " + " | ".join(fmt(s["task_points"][t]) for t in tasks)
                 + f" | {s['params_per_task']['accounted']:,.0f} | {s['params_per_task']['unique_new']:,.0f} | {s['system_params']:,.0f} | {s['wall_seconds_per_job']:.0f} |")
    L.append("\nParameters: *accounted* is the paper's (each component / tasks sharing it); *unique new* counts parameters no other task "
             "and not the root holds; *system* counts every unique parameter of the whole multitask system once.\n")
    L.append(f"## Paired differences (points; best baseline by mean: {best})\n")
    L.append("| a - b | seeds | avg [95 % CI] | " + " | ".join(tasks) + " |")
    L.append("|---|---|---|" + "---|" * len(tasks))
    for c in comps:
        L.append(f"| {c['strategy']} - {c['against']} | {len(c['seeds'])} | {fmt(c['avg'], True)} | " + " | ".join(fmt(c["tasks"][t], True) for t in tasks) + " |")
    changes = [c for c in comps if c.get("change")]
    if changes:
        L.append("\n## Method changes tried: after minus before, paired (points)\n")
        L.append("| change (`mutask evolve` flags) | before | after | before points | after points | after - before [95 % CI] | unique new params/task before -> after |")
        L.append("|---|---|---|---|---|---|---|")
        for c in changes:
            a, b = summary[c["strategy"]], summary[c["against"]]
            L.append(f"| {c['change']} (`{' '.join(a['change_flags'] or [])}`) | {c['against']} | {c['strategy']} | {fmt(b['avg_points'])} | "
                     f"{fmt(a['avg_points'])} | {fmt(c['avg'], True)} | {b['params_per_task']['unique_new']:,.0f} -> {a['params_per_task']['unique_new']:,.0f} |")
    L.append("\n## Winning paths (seed 0)\n")
    L.append("| strategy | " + " | ".join(tasks) + " |")
    L.append("|---|" + "---|" * len(tasks))
    for r in sorted(ok(recs), key=lambda r: list(summary).index(r["name"])):
        if r["seed"] == 0:
            L.append(f"| {r['name']} | " + " | ".join(structure_text(r["tasks"][t]["structure"]) for t in tasks) + " |")
    L.append("\n## muNet's search (per job: children, accepted, mutated children accepted, generations per visit, tasks whose winning path is not a direct child of the root)\n")
    L.append("| job | children | accepted | mutated accepted / mutated | generations/visit | winner not a direct child of the root |")
    L.append("|---|---|---|---|---|---|")
    for r in ok(recs):
        if r["kind"] == "munet":
            st = search_stats(r)
            L.append(f"| {r['name']} seed {r['seed']} | {st['children']} | {st['accepted']} | {st['mutated_accepted']} / {st['mutated']} | "
                     f"{st['generations_per_visit']} | {st['winners_not_from_root']} / {len(r['tasks'])} |")
    for r in recs:
        if r.get("compute_mismatch"):
            L.append(f"\n**Compute mismatch** in {r['name']} seed {r['seed']}: {r['compute_mismatch']}.")
    bad = [r for r in recs if "failed" in r or "skipped" in r]
    if bad:
        L.append("\n## Jobs that failed or were skipped\n")
        for r in bad:
            L.append(f"- {r['name']} seed {r['seed']}: " + (r.get("skipped") or r["failed"].strip().splitlines()[-1][:300]))
    if meta.get("note"):
        L.append(f"\nNote: {meta['note']}")
    return "\n".join(L)


def picture(path: Path, summary: dict, tasks: list[str]) -> str | None:
    """Accuracy against unique new parameters per task; None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no picture: matplotlib is not installed here ({e})"
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    curves: dict = {}  # muNet's s sweep, one curve per method change (none: the reference)
    for i, (n, s) in enumerate(summary.items()):
        c = colours[i % len(colours)]
        iv = s["avg_points"]
        if iv["mean"] is None:
            continue
        xs = [max(1.0, s["unique_new_per_seed"][seed]) for seed in s["points_per_seed"]]
        ax.scatter(xs, list(s["points_per_seed"].values()), color=c, alpha=0.35, s=18)
        x = max(1.0, s["params_per_task"]["unique_new"])
        yerr = None if iv["lo"] is None else [[iv["mean"] - iv["lo"]], [iv["hi"] - iv["mean"]]]
        ax.errorbar([x], [iv["mean"]], yerr=yerr, fmt="o" if s["kind"] == "munet" else "s", color=c, capsize=4, ms=7, label=n)
        if n.startswith("munet-s"):
            curves.setdefault(s.get("change"), []).append((s["scale_factor"], x, iv["mean"]))
    for (change, curve), style in zip(curves.items(), ("k--", "k:", "k-.", "k-")):
        if len(curve) > 1:
            curve.sort()
            ax.plot([c[1] for c in curve], [c[2] for c in curve], style, lw=1, label="muNet s sweep" + (f" +{change}" if change else ""))
            for sf, x, y in curve:
                ax.annotate(f"s={sf:g}", (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("unique new parameters per task (log)")
    ax.set_ylabel(f"test accuracy, points (mean over {len(tasks)} tasks)")
    ax.set_title("Accuracy vs parameters per task: seeds (faint), mean with 95 % CI")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_record(out: Path, meta: dict, recs: list[dict], planned: int, keep_date: bool = False) -> dict:
    from mutask.benchmarks.harness import SHARED, machine, machine_line

    tasks = meta["tasks"]
    summary = summarize(recs, tasks)
    best, comps = comparisons(recs, tasks, summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    png_note = picture(Path(f"{out}.png"), summary, tasks) if summary else "no picture: no finished job"
    m = meta.get("machine") or machine(shared_machine=meta.get("note") or SHARED)
    if not m.get("gpu"):  # harness.machine() reads the GPU only where torch is loaded; this process drives the jobs
        import torch

        m["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        from importlib.metadata import version

        m.setdefault("peft", version("peft"))
    except Exception:
        pass
    if not keep_date:
        m["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    meta["machine"] = m
    md = markdown(meta, summary, best, comps, recs, tasks, planned)
    md += (f"\n\n![accuracy vs unique parameters per task]({out.name}.png)\n" if png_note is None else f"\n\n({png_note})\n")
    md += f"\n{machine_line(m)} timm {m.get('timm')}, peft {m.get('peft', 'not installed')}.\n"
    doc = {"benchmark": "quality-protocol", "units": "points = test accuracy x 100; intervals: 95 % t over seeds", **meta,
           "jobs_planned": planned, "jobs_finished": len(ok(recs)), "best_baseline": best, "summary": summary,
           "paired": comps, "picture": png_note or f"{out.name}.png", "jobs": recs}
    Path(f"{out}.json").write_text(json.dumps(doc, indent=1))
    Path(f"{out}.md").write_text(md)
    return doc
