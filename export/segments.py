"""Cutting the tasks' paths into shared segments (torch-free).

Each path step is keyed by (component id, the path's image size): the same component at
another image size sees other token counts, so it is another step. The tasks' step
sequences, each step pointing to the next, form a directed acyclic graph of steps: a frozen
component that several tasks use is one node even when the tasks reach it through different
(cloned) earlier components, because every step works on each image's rows alone, so rows
of different tasks can run through it in one batch. A *segment* is a maximal run of steps
u1 -> u2 -> ... -> uk where every task through u(i) goes next to u(i+1) and every task
through u(i+1) comes from u(i) (so the same tasks pass the whole run). Each step lies in
exactly one segment. A task's chain is the segments on its path, first to last; a segment's
``parents`` are the segments that feed it (several when tasks with different prefixes meet).

A prefix tree (tasks sharing only a common beginning) is the special case where every
segment has at most one parent.
"""

from __future__ import annotations


def plan_segments(steps: dict[str, list[tuple[str, int]]]) -> tuple[dict, dict]:
    """``steps``: task -> its path as [(component id, image size), ...], in task order.

    Returns (segments, chains): segments ``{sid: {"components", "image_size", "tasks",
    "parents", "input", "output"}}`` with ids ``s0, s1, ...`` in a topological order (a
    segment comes after every segment that feeds it; ties by first appearance in task order),
    chains ``{task: [sid, ...]}`` first to last. ``ValueError`` when the paths cannot be cut:
    an empty path, a step that one path starts (or ends) with and another has in its middle,
    a step twice in one path, or paths that order two steps differently (a cycle)."""
    order: dict = {}  # step -> first appearance (deterministic tie-break)
    tasks_at: dict = {}
    nxt: dict = {}  # step -> set of following steps (None: a path ends here)
    prv: dict = {}  # step -> set of preceding steps (None: a path starts here)
    for task, seq in steps.items():
        if not seq:
            raise ValueError(f"task {task!r} has an empty path")
        if len(set(seq)) != len(seq):
            raise ValueError(f"task {task!r} has a step twice in its path: {seq}")
        for i, key in enumerate(seq):
            order.setdefault(key, len(order))
            tasks_at.setdefault(key, []).append(task)
            nxt.setdefault(key, set()).add(seq[i + 1] if i + 1 < len(seq) else None)
            prv.setdefault(key, set()).add(seq[i - 1] if i else None)
    for key in order:
        if None in prv[key] and len(prv[key]) > 1:
            raise ValueError(f"step {key} starts the path of some tasks and follows another step in others {tasks_at[key]}")
        if None in nxt[key] and len(nxt[key]) > 1:
            raise ValueError(
                f"step {key} ends the path of some of {tasks_at[key]} and is followed by another step in others; "
                "a path must end with its own head"
            )

    def merges(u, v) -> bool:  # v continues u's run
        return nxt[u] == {v} and prv[v] == {u}

    # runs: start at every step that does not continue its single predecessor's run
    heads = [k for k in order if not (len(prv[k]) == 1 and None not in prv[k] and merges(next(iter(prv[k])), k))]
    run_of: dict = {}
    runs: dict = {}
    for h in heads:
        run, k = [h], h
        while len(nxt[k]) == 1 and None not in nxt[k] and merges(k, next(iter(nxt[k]))):
            k = next(iter(nxt[k]))
            run.append(k)
        runs[h] = run
        for k in run:
            run_of[k] = h
    if len(run_of) != len(order):  # a run closed on itself: steps in a cycle
        raise ValueError("the tasks' paths order some steps differently (a cycle); they cannot be cut into segments")
    parents = {h: {run_of[p] for p in prv[h] if p is not None} for h in runs}

    # topological order of the runs (Kahn), ties by first appearance
    pending = {h: len(ps) for h, ps in parents.items()}
    children: dict = {h: [] for h in runs}
    for h, ps in parents.items():
        for p in ps:
            children[p].append(h)
    ready = sorted((h for h, n in pending.items() if n == 0), key=order.get)
    topo = []
    while ready:
        h = ready.pop(0)
        topo.append(h)
        for c in children[h]:
            pending[c] -= 1
            if pending[c] == 0:
                ready.append(c)
        ready.sort(key=order.get)
    if len(topo) != len(runs):
        raise ValueError("the tasks' paths order some steps differently (a cycle); they cannot be cut into segments")

    sid_of = {h: f"s{i}" for i, h in enumerate(topo)}
    segments: dict[str, dict] = {}
    for h in topo:
        run = runs[h]
        segments[sid_of[h]] = {
            "components": [k[0] for k in run],
            "image_size": int(h[1]),
            "tasks": list(tasks_at[h]),
            "parents": sorted((sid_of[p] for p in parents[h]), key=lambda s: int(s[1:])),
            "input": "image" if None in prv[h] else "hidden",
            "output": "logits" if None in nxt[run[-1]] else "hidden",
        }
    chains = {t: list(dict.fromkeys(sid_of[run_of[k]] for k in seq)) for t, seq in steps.items()}
    return segments, chains
