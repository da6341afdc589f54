"""The fair quality protocol: muNet against tuned baselines on a real root, matched compute,
paired seeds, intervals, three parameter counts, per-child history, one trade-off picture.

    python -m mutask.benchmarks.protocol --preset {tiny,cpu,gpu} --out benchmarks/results/quality-real

writes ``OUT.json``, ``OUT.md`` and ``OUT.png`` (docs/quality.md explains the protocol and its
presets). Every (strategy, seed) is one job in its own process, ``--jobs`` at a time:

- muNet jobs run the stable command line ``python -m mutask.cli evolve`` (strategies ``munet``
  at each scale factor of the preset, and ``munet-noseed``: muNet without cross-task seeds);
  the job record is read from the STATE's ``state.json`` (:mod:`.protocol_munet`);
- baseline jobs run :mod:`.protocol_baselines` (plain torch loops with mutask's trainer):
  linear probe, fine-tune, freeze-K, residual adapters, LoRA through ``peft``.

Matched compute: every strategy trains on ``rounds x children x steps x batch`` images per task.
muNet spends them on its children (seeds included); a baseline on its learning-rate candidates,
each trained from the root for ``rounds x children x steps / candidates`` steps. Every
baseline has the same number of distinct learning-rate candidates.

Seeds: seed N is both the evolution seed (``--seed N``; the baselines' init and batch order)
and the data seed: each task's train/validation/test split is built for seed N
(``load_embedded(name, N)``) and handed to every job of that seed as the task cache of seed 0
(``MUTASK_CACHE=WORK/data/seedN``), because ``mutask evolve`` takes its data seed from the
cache only. Finished jobs are kept in ``--work``: a rerun skips them (``--resume`` semantics
by default), and the record is rewritten after every job, so a run cut short still leaves one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mutask.benchmarks.protocol_munet import evolve_command, read_state

BASE_TASKS = ["digits", "shapes", "textures"]
PRESETS = {
    "tiny": dict(tasks=["digits", "shapes"], optional_tasks=[], seeds=2, root="efficientnet-lite0", image_size=32,
                 rounds=1, children=4, generation_size=2, steps=2, batch_size=8, validations=1, lr_candidates=2,
                 scale_factors=[1.0, 0.5], baselines=["probe", "finetune", "freeze:8", "adapters:16", "lora:4"],
                 jobs=2, launch_deadline_s=None, job_timeout_s=None),
    "cpu": dict(tasks=BASE_TASKS, optional_tasks=["fashion"], seeds=3, root="efficientnet-lite0", image_size=64,
                rounds=2, children=8, generation_size=2, steps=10, batch_size=32, validations=2, lr_candidates=4,
                scale_factors=[1.0, 0.5], baselines=["probe", "finetune", "freeze:8", "adapters:16", "lora:8"],
                jobs=2, launch_deadline_s=None, job_timeout_s=None),
    "gpu": dict(tasks=BASE_TASKS, optional_tasks=["fashion"], seeds=3, root="efficientnet-lite0", image_size=64,
                rounds=2, children=8, generation_size=2, steps=50, batch_size=64, validations=2, lr_candidates=4,
                scale_factors=[1.0, 0.5, 0.1], baselines=["probe", "finetune", "freeze:8", "adapters:16", "lora:8"],
                jobs=14, launch_deadline_s=200, job_timeout_s=330),
}
# Each baseline's learning-rate candidates (muNet's lr list), centred where that kind trains
# best: heads and adapters take larger rates than a whole network. Presets take the first
# ``lr_candidates`` of each, so every baseline gets the same number of distinct candidates.
LRS = {
    "probe": [0.05, 0.02, 0.1, 0.01],
    "finetune": [0.01, 0.005, 0.02, 0.002],
    "freeze": [0.01, 0.005, 0.02, 0.002],
    "adapters": [0.02, 0.01, 0.05, 0.005],
    "lora": [0.02, 0.01, 0.05, 0.005],
}


# Method changes tried on muNet (issue 25), each a set of `mutask evolve` flags; a job labelled
# ``BASE+CHANGE`` (``--also munet-s1+lr``) is muNet job BASE run with CHANGE's flags, and the record
# pairs it with BASE seed by seed (its before/after row).
CHANGES = {
    # the lr prior: every baseline's LR sweep that trains more than a head picks 0.02 or 0.05,
    # where muNet starts at 0.01 and its winners stay there (quality-real's first record)
    "lr": ["--lr", "0.02"],
    # the lr prior, and mu pinned at 0.3 (the top of mu2Net's list): more clones and adapters per child
    "lr-mu": ["--lr", "0.02", "--mutation-prob", "0.3"],
    # the lr prior, and a task's second visit spends its root seed on the population instead
    "lr-noreseed": ["--lr", "0.02", "--no-root-reseed"],
    # the lr prior, and each generation's first mutated slot continues the best path unmutated
    # (the per-child histories: at 10 steps a child's new clones and adapters rarely beat their
    # parent; what wins is a lineage trained longer)
    "lr-cont": ["--lr", "0.02", "--continue-best"],
}


def label(strategy: str, scale_factor: float | None = None) -> str:
    if strategy == "munet":
        return f"munet-s{scale_factor:g}"
    return strategy.replace(":", "-")


def plan(p: dict, tasks: list[str], also: list[str] = ()) -> list[dict]:
    """Every job, seed-major (a run cut short keeps whole seeds), muNet first within a seed;
    ``also``: muNet jobs with a method change, ``BASE+CHANGE`` (see CHANGES)."""
    images = p["rounds"] * p["children"] * p["steps"] * p["batch_size"]
    k = p["lr_candidates"]
    steps_each = p["rounds"] * p["children"] * p["steps"] // k
    if steps_each * k != p["rounds"] * p["children"] * p["steps"]:
        raise SystemExit(f"rounds x children x steps must divide by lr_candidates ({k}) to match compute exactly")
    jobs = []
    for seed in range(p["seeds"]):
        for s in p["scale_factors"]:
            jobs.append(dict(name=label("munet", s), kind="munet", strategy="munet", scale_factor=s, seed=seed))
        jobs.append(dict(name="munet-noseed", kind="munet", strategy="munet-noseed", scale_factor=1.0, seed=seed))
        base = {j["name"]: j for j in jobs if j["seed"] == seed and j["kind"] == "munet"}
        for name in also:
            first, _, change = name.partition("+")
            if first not in base or change not in CHANGES:
                raise SystemExit(f"--also {name!r}: use BASE+CHANGE, BASE one of {sorted(base)}, CHANGE one of {sorted(CHANGES)}")
            jobs.append(dict(base[first], name=name, change=change, before=first))
        for b in p["baselines"]:
            kind = b.partition(":")[0]
            jobs.append(dict(name=label(b), kind="baseline", strategy=b, seed=seed, lrs=LRS[kind][:k], steps=steps_each))
    for j in jobs:
        j["train_images_per_task"] = images
    return jobs


def available_tasks(p: dict) -> tuple[list[str], dict]:
    from mutask.evolve.suite import TASKS
    from mutask.evolve.suite.cache import cache_path

    tasks, skipped = list(p["tasks"]), {}
    for t in p["optional_tasks"]:
        if TASKS[t].available() or all(cache_path(t, s).exists() for s in range(p["seeds"])):
            tasks.append(t)
        else:
            skipped[t] = TASKS[t].unavailable_reason()
    return tasks, skipped


def prepare_data(work: Path, tasks: list[str], seeds: int) -> None:
    """``WORK/data/seedN``: each task built for data seed N, under seed 0's cache name."""
    from mutask.evolve.suite.cache import cache_path, load_embedded

    for seed in range(seeds):
        for t in tasks:
            dest = work / "data" / f"seed{seed}" / "tasks" / cache_path(t, 0).name
            if not dest.exists():
                load_embedded(t, seed)  # built into (or read from) the usual cache, MUTASK_CACHE where set
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cache_path(t, seed), dest)


def job_command(j: dict, p: dict, tasks: list[str], work: Path, threads: int | None) -> list[str]:
    if j["kind"] == "munet":
        return evolve_command(j["strategy"], j["scale_factor"], tasks, j["seed"], work / "runs" / f"{j['name']}-seed{j['seed']}.state", p, threads) + CHANGES.get(j.get("change"), [])
    cmd = [sys.executable, "-m", "mutask.benchmarks.protocol_baselines", "--strategy", j["strategy"], "--root", p["root"],
           "--image-size", str(p["image_size"]), "--lrs", ",".join(map(str, j["lrs"])), "--steps", str(j["steps"]),
           "--batch-size", str(p["batch_size"]), "--validations", str(p["validations"]), "--seed", str(j["seed"]),
           "--out", str(work / "runs" / f"{j['name']}-seed{j['seed']}.raw.json")]
    for t in tasks:
        cmd += ["--task", t]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def finish(j: dict, rc: int, seconds: float, work: Path, cmd: list[str]) -> dict:
    """The job's record: read back from its STATE or its baseline JSON."""
    stem = work / "runs" / f"{j['name']}-seed{j['seed']}"
    log_tail = Path(f"{stem}.log").read_text()[-2000:] if Path(f"{stem}.log").exists() else ""
    doc = {"name": j["name"], "kind": j["kind"], "strategy": j["strategy"], "seed": j["seed"], "data_seed": j["seed"],
           "wall_seconds": round(seconds, 1), "command": " ".join(cmd[1:]), "train_images_per_task": j["train_images_per_task"]}
    if rc != 0:
        return dict(doc, failed=f"exit status {rc}: {log_tail}")
    if j["kind"] == "munet":
        doc.update(read_state(f"{stem}.state"), engine="mutask evolve (command line)", scale_factor=j["scale_factor"])
        if j.get("change"):
            doc.update(change=j["change"], change_flags=CHANGES[j["change"]], before=j["before"])
        off = {t: r["train_images"] for t, r in doc["tasks"].items() if r["train_images"] != j["train_images_per_task"]}
        if off:  # the evolve engine trained another number of images than planned (e.g. children stopped early)
            doc["compute_mismatch"] = f"planned {j['train_images_per_task']} training images per task, trained {off}"
    else:
        raw = json.loads(Path(f"{stem}.raw.json").read_text())
        doc.update({k: v for k, v in raw.items() if k not in ("wall_seconds", "strategy", "seed")})
    return doc


def run_jobs(jobs: list[dict], p: dict, tasks: list[str], work: Path, jobs_at_once: int, on_done) -> None:
    """Run the jobs not yet recorded, ``jobs_at_once`` at a time; ``on_done(record)`` after each."""
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not (runs / f"{j['name']}-seed{j['seed']}.json").exists()]
    threads = max(1, (os.cpu_count() or 1) // jobs_at_once)
    running, t_start = [], time.time()
    while todo or running:
        late = p["launch_deadline_s"] is not None and time.time() - t_start > p["launch_deadline_s"]
        while todo and len(running) < jobs_at_once and not late:
            j = todo.pop(0)
            stem = runs / f"{j['name']}-seed{j['seed']}"
            shutil.rmtree(f"{stem}.state", ignore_errors=True)  # an interrupted run's STATE
            cmd = job_command(j, p, tasks, work, threads)
            env = dict(os.environ, MUTASK_CACHE=str((work / "data" / f"seed{j['seed']}").resolve()), BENTOML_DO_NOT_TRACK="true")
            log = open(f"{stem}.log", "w")
            running.append((j, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), cmd, log))
        if late and todo:
            print(f"launch deadline passed: {len(todo)} job(s) not started", file=sys.stderr)
            todo = []
        time.sleep(0.5)
        for item in list(running):
            j, proc, t0, cmd, log = item
            if proc.poll() is None and p["job_timeout_s"] is not None and time.time() - t0 > p["job_timeout_s"]:
                proc.kill()
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                rec = finish(j, proc.returncode, time.time() - t0, work, cmd)
                (runs / f"{j['name']}-seed{j['seed']}.json").write_text(json.dumps(rec, indent=1))
                print(f"{j['name']} seed {j['seed']}: {'FAILED' if 'failed' in rec else 'done'} in {rec['wall_seconds']:.0f} s", file=sys.stderr)
                on_done()


def records(jobs: list[dict], work: Path) -> list[dict]:
    out = []
    for j in jobs:
        f = work / "runs" / f"{j['name']}-seed{j['seed']}.json"
        if f.exists():
            out.append(json.loads(f.read_text()))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS))
    ap.add_argument("--render", metavar="RECORD.json", help="only rewrite OUT.{json,md,png} from this record (e.g. to draw the picture "
                    "where matplotlib is installed); its machine info and dates are kept")
    ap.add_argument("--out", required=True, help="record path without suffix: writes OUT.json, OUT.md, OUT.png")
    ap.add_argument("--work", help="where jobs keep their STATEs, logs and records (default: runs/protocol-PRESET); a rerun skips finished jobs")
    ap.add_argument("--jobs", type=int, help="jobs at once (default: the preset's)")
    ap.add_argument("--seeds", type=int, help="paired seeds (default: the preset's)")
    ap.add_argument("--steps", type=int, help="steps per muNet child (default: the preset's); baselines follow")
    ap.add_argument("--job-timeout-s", type=float, help="kill a job after this many seconds (default: the preset's)")
    ap.add_argument("--only", help="comma-separated strategy labels to run (e.g. munet-s1,probe); default: all of the preset's")
    ap.add_argument("--also", default="", help="comma-separated muNet jobs with a method change, BASE+CHANGE (e.g. munet-s1+lr; "
                    f"changes: {', '.join(CHANGES)}); each is paired with BASE in the record")
    ap.add_argument("--fresh", action="store_true", help="remove --work first instead of reusing finished jobs")
    ap.add_argument("--note", default="", help="a line for the record (e.g. 'the machine was shared by other work')")
    a = ap.parse_args(argv)
    from mutask.benchmarks.protocol_report import write_record

    if a.render:
        doc = json.loads(Path(a.render).read_text())
        meta = {k: doc[k] for k in ("preset", "protocol", "tasks", "tasks_skipped", "lr_candidates", "note", "data_seconds", "started", "wall_seconds", "machine") if k in doc}
        write_record(Path(a.out), meta, doc["jobs"], planned=doc["jobs_planned"], keep_date=True)
        print(Path(f"{a.out}.md").read_text())
        return
    if a.preset is None:
        ap.error("--preset is required (or --render RECORD.json)")
    p = dict(PRESETS[a.preset])
    for k in ("jobs", "seeds", "steps", "job_timeout_s"):
        if getattr(a, k) is not None:
            p[k] = getattr(a, k)
    work = Path(a.work or f"runs/protocol-{a.preset}")
    if a.fresh:
        shutil.rmtree(work, ignore_errors=True)
    tasks, skipped = available_tasks(p)
    t0 = time.time()
    prepare_data(work, tasks, p["seeds"])
    also = [x for x in a.also.split(",") if x]
    jobs = plan(p, tasks, also)
    if a.only:
        keep = set(a.only.split(",")) | set(also)
        unknown = keep - {j["name"] for j in jobs}
        if unknown:
            raise SystemExit(f"--only: unknown strategy label(s) {sorted(unknown)}; the preset has {sorted({j['name'] for j in jobs})}")
        jobs = [j for j in jobs if j["name"] in keep]
    meta = {"preset": a.preset, "protocol": {k: v for k, v in p.items()}, "tasks": tasks, "tasks_skipped": skipped,
            "lr_candidates": {label(b): LRS[b.partition(":")[0]][: p["lr_candidates"]] for b in p["baselines"]},
            "note": a.note, "data_seconds": round(time.time() - t0, 1), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}

    def rewrite():
        meta["wall_seconds"] = round(time.time() - t0, 1)
        write_record(Path(a.out), meta, records(jobs, work), planned=len(jobs))

    run_jobs(jobs, p, tasks, work, p["jobs"], rewrite)
    rewrite()
    print(Path(f"{a.out}.md").read_text())


if __name__ == "__main__":
    main()
