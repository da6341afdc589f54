"""Dispatch on Ray (:class:`RayPool`): a generation's children trained on Ray workers
(``mutask evolve --workers N`` on this machine, ``--ray-address ADDR`` on a Ray cluster), the
same interface as :class:`~.dispatch.InProcess`. The only module that imports Ray; ``mutask
evolve`` imports it only when one of those options is given.

The driver (:class:`~.evolution.Evolution`) keeps everything that decides: it samples the
parents, makes every child, accepts them in child order and saves STATE at generation
boundaries. A worker only trains one child (:func:`train_child`, a Ray task): it gets the
child's component ids and names, its fresh (trainable) components, the hyperparameters,
:func:`~.train.train`'s settings (the generation's batch seed among them) and a reference to
the frozen components, which the driver puts into the object store once per generation; it
returns the trained fresh components' tensors and the :class:`~.train.TrainResult`.

Data never travels through the driver: a worker loads the child's task by the spec recorded in
STATE (embedded tasks are rebuilt deterministically, from the cache on each node; ImageFolder
tasks are read by path, so on a cluster the folder must be at the same path on every node,
e.g. shared storage), once per worker process.

A worker process that dies mid-child (killed, out of memory, its node lost) makes Ray run that
child again (``max_retries``); training is a pure function of the job, so the run ends with
the same STATE.
"""

from __future__ import annotations

import logging
import time

import torch

from mutask.cores import available_cores
from mutask.errors import MutaskError

try:
    import ray
except ImportError:  # pragma: no cover - exercised only where Ray is missing
    ray = None

log = logging.getLogger("mutask")

RETRIES = 3  # times Ray runs a child again whose worker died
_TASKS: dict = {}  # (spec, seed) -> TaskData, per worker process


def _task_data(spec: str, seed: int):
    from .tasks import load_task

    key = (spec, seed)
    if key not in _TASKS:
        _TASKS[key] = load_task(spec, seed=seed, show_progress=False)
    return _TASKS[key]


def _on_cpu(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` itself on the CPU, else a CPU copy (the driver's stay where they are)."""
    if all(t.device.type == "cpu" for t in module.state_dict().values()):
        return module
    import copy

    return copy.deepcopy(module).cpu()


def train_child(job: dict, frozen: dict) -> tuple:
    """Train one child on this worker; returns (fresh tensors by component id, TrainResult,
    seconds training, seconds loading the task's data). ``frozen``: component id -> module,
    shared by the generation's children."""
    from .model import PathModel
    from .train import device, train

    torch.set_num_threads(job["threads"])
    dev = device()
    t_data = time.perf_counter()
    data = _task_data(job["spec"], job["data_seed"])
    data_seconds = time.perf_counter() - t_data
    fresh = job["fresh"]
    modules = [fresh[cid] if cid in fresh else frozen[cid] for cid in job["components"]]
    model = PathModel(job["names"], modules).to(dev)
    params = [p for cid in fresh for p in fresh[cid].parameters()]
    t0 = time.perf_counter()
    result = train(model, params, data.train, data.validation, job["hparams"], **job["settings"])
    seconds = time.perf_counter() - t0
    tensors = {cid: {k: v.detach().cpu() for k, v in m.state_dict().items()} for cid, m in fresh.items()}
    return tensors, result, seconds, data_seconds


class RayPool:
    """Runs children on Ray: ``workers`` at a time (None with ``address``: as many as the
    cluster's resources allow), each with ``threads`` torch threads (default: this machine's
    cores / ``workers``; 1 per child on a cluster) and, where there are GPUs, one GPU. A
    context manager: it starts a local Ray (or joins ``address``: ``auto`` or ``HOST:PORT``)
    on entry unless Ray is already initialised in this process, and shuts down what it started
    on exit, however the run ends."""

    def __init__(self, workers: int | None = None, address: str | None = None, threads: int | None = None, temp_dir: str | None = None):
        if ray is None:
            raise MutaskError("--workers and --ray-address need Ray, which is not installed: pip install 'mutask[ray]' (or pip install ray).")
        if workers is not None and workers < 1:
            raise MutaskError(f"--workers must be at least 1 (got {workers}).")
        if workers is None and address is None:
            raise MutaskError("give --workers N (a local Ray on this machine) or --ray-address ADDR (a Ray cluster), or neither.")
        if threads is not None and threads < 1:
            raise MutaskError(f"--threads must be at least 1 (got {threads}).")
        self.workers, self.address, self.temp_dir = workers, address, temp_dir
        self.threads = threads or (1 if address is not None else max(1, available_cores() // workers))
        self.started = False
        self.gpus = 0
        self.timings: list[dict] = []  # per child: seconds in flight, training, loading data; per generation: the put

    def __enter__(self) -> "RayPool":
        if not ray.is_initialized():
            gpus = torch.cuda.device_count()
            kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if self.address is None:
                kwargs.update(num_cpus=self.workers * self.threads, num_gpus=gpus)
                if self.temp_dir:
                    kwargs["_temp_dir"] = str(self.temp_dir)
            try:
                ray.init(address=self.address or "local", **kwargs)  # local: a new instance, not one `ray start` left running
            except ConnectionError as e:
                raise MutaskError(f"cannot join the Ray cluster at --ray-address {self.address!r}: {e}. Start it with `ray start --head` (or check the address).") from e
            self.started = True
        self.gpus = int(ray.cluster_resources().get("GPU", 0))
        log.info("training children on Ray: %s worker(s), %d thread(s) each%s", self.workers or "cluster", self.threads, ", one GPU each" if self.gpus else "")
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            ray.shutdown()
            self.started = False

    def train_generation(self, ops, task: str, children: list, batch_seed: int, on_done=None) -> list[dict]:
        """Train ``children`` ([(TaskPath, fresh components)]) of a generation on the workers
        (``ops``: the loop's :class:`~.operators.Operators`); load each trained child's tensors
        into its fresh components and return the history records in child order. ``on_done()``
        is called as each child finishes (in any order)."""
        s = ops.sys
        record = s.tasks[task]
        frozen_ids = {cid for child, fresh in children for cid in child.components if cid not in fresh}
        t_put = time.perf_counter()
        frozen = ray.put({cid: _on_cpu(s.store[cid].module) for cid in sorted(frozen_ids)})  # once per generation
        put_seconds = time.perf_counter() - t_put
        remote = ray.remote(train_child).options(  # proctitle ray::mutask_child while it trains
            num_cpus=self.threads, num_gpus=1 if self.gpus else 0, max_retries=RETRIES, retry_exceptions=False, name="mutask_child",
        )
        jobs = []
        for child, fresh in children:
            settings = ops.train_settings(child, batch_seed)
            jobs.append(dict(
                spec=record["spec"], data_seed=record.get("seed", 0), threads=self.threads,
                components=list(child.components), names=[fresh[c].name if c in fresh else s.store[c].name for c in child.components],
                fresh={cid: _on_cpu(c.module) for cid, c in fresh.items()}, hparams=dict(child.hparams), settings=settings,
            ))
        limit = self.workers or len(jobs)
        pending, results, queue, submitted = {}, [None] * len(jobs), list(range(len(jobs))), {}
        while queue or pending:
            while queue and len(pending) < limit:
                i = queue.pop(0)
                submitted[i] = time.perf_counter()
                pending[remote.remote(jobs[i], frozen)] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            results[i] = ray.get(done[0])
            self.timings.append(dict(task=task, child=i, in_flight_s=time.perf_counter() - submitted[i], train_s=results[i][2],
                                     data_s=results[i][3], put_s=put_seconds if i == 0 else 0.0))
            if on_done is not None:
                on_done()
        records = []
        for (child, fresh), (tensors, result, seconds, _) in zip(children, results):
            for cid, comp in fresh.items():
                comp.module.load_state_dict(tensors[cid])
            records.append(ops.judge_child(task, child, fresh, result, seconds))
        return records
