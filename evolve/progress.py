"""Where an unfinished evolution stands (:class:`Progress`) and the task visit in flight
(:class:`Visit`): what ``state.json`` keeps under ``progress`` so ``--resume`` continues a run
at its last generation boundary."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Visit:
    """One task's visit: ``generation`` generations done; ``population`` the ids of the paths
    accepted so far (the task's previous best first, when it has one); ``child_counts`` how
    many children each parent has had; ``seeds`` the seed paths still to try, in order;
    ``started`` its wall-clock start (``time.time()``)."""

    task: str
    generation: int = 0
    population: list[str] = field(default_factory=list)
    child_counts: dict[str, int] = field(default_factory=dict)
    seeds: list[str] = field(default_factory=list)
    started: float = 0.0

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "generation": self.generation,
            "population": list(self.population),
            "child_counts": dict(self.child_counts),
            "seeds": list(self.seeds),
            "started": self.started,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Visit":
        return cls(d["task"], d["generation"], list(d["population"]), dict(d["child_counts"]), list(d["seeds"]), d["started"])


@dataclass
class Progress:
    """A run in progress: the round, the index of the task being visited in the run's task
    order, and that task's visit (None between visits)."""

    round: int = 0
    task_index: int = 0
    visit: Visit | None = None

    def to_json(self) -> dict:
        return {"round": self.round, "task_index": self.task_index, "visit": self.visit.to_json() if self.visit is not None else None}

    @classmethod
    def from_json(cls, d: dict | None) -> "Progress | None":
        if d is None:
            return None
        return cls(d["round"], d["task_index"], Visit.from_json(d["visit"]) if d.get("visit") is not None else None)
