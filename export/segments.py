"""Cutting the tasks' paths into shared segments (torch-free).

Each path step is keyed by (component id, the path's image size): the same component at
another image size sees other token counts, so it is another step. The tasks' step
sequences form a prefix tree (trie); a *segment* is a maximal run of trie nodes that the
same set of tasks passes through. A task's chain is the segments on its root-to-leaf walk.
"""

from __future__ import annotations


class _Node:
    __slots__ = ("key", "tasks", "children", "ends", "depth")

    def __init__(self, key, depth):
        self.key = key
        self.tasks: list[str] = []
        self.children: dict = {}
        self.ends: list[str] = []
        self.depth = depth


def plan_segments(steps: dict[str, list[tuple[str, int]]]) -> tuple[dict, dict]:
    """``steps``: task -> its path as [(component id, image size), ...], in task order.

    Returns (segments, chains): segments ``{sid: {"components", "image_size", "tasks",
    "parent", "start", "input", "output"}}`` with ids ``s0, s1, ...`` in depth-first order,
    ``start`` the index of the segment's first step in its tasks' paths; chains
    ``{task: [sid, ...]}`` first to last."""
    root = _Node(None, -1)
    for task, seq in steps.items():
        if not seq:
            raise ValueError(f"task {task!r} has an empty path")
        node = root
        for key in seq:
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = _Node(key, node.depth + 1)
            child.tasks.append(task)
            node = child
        node.ends.append(task)

    segments: dict[str, dict] = {}
    chains: dict[str, list[str]] = {t: [] for t in steps}

    def walk(first: _Node, parent: str | None):
        run = [first]
        node = first
        while len(node.children) == 1 and not node.ends:
            (child,) = node.children.values()
            if child.tasks != node.tasks:
                break
            run.append(child)
            node = child
        if node.ends and node.children:
            raise ValueError(f"the path of {node.ends} is a prefix of other tasks' paths; a path must end with its own head")
        sid = f"s{len(segments)}"
        segments[sid] = {
            "components": [n.key[0] for n in run],
            "image_size": int(first.key[1]),
            "tasks": list(first.tasks),
            "parent": parent,
            "start": first.depth,
            "input": "image" if first.depth == 0 else "hidden",
            "output": "logits" if not node.children else "hidden",
        }
        for t in first.tasks:
            chains[t].append(sid)
        for child in node.children.values():
            walk(child, sid)

    for child in root.children.values():
        walk(child, None)
    return segments, chains
