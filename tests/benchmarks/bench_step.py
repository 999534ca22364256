"""Where a BAM pretraining step's time goes, and where a whole demo run's time goes.

Run: `python tests/benchmarks/bench_step.py [--shapes demo vit_small] [--repeats 10] [--device cpu|cuda]
[--threads N] [--run-epochs 22]`. Not a test: nothing here asserts a time; the tables are for
people to read (see docs/results-cost.md, "Where the time goes").

Step split (`--shapes`): the model is built from the shipped recipe through `bam pretrain`'s own
parser (`pretrain_cli(..., run=False)`), so the backbone, projector, teacher, objective and crop
recipe are the ones a run uses:
- `demo`: `configs/pretrain/demo.yaml` as shipped (batch 256, 2x28 + 4x14 px crops);
- `vit_small`: `configs/pretrain/vit_small_patch16.yaml` at reduced crop sizes (2x64 + 6x32 px by
  default, `--vit-sizes`) and batch (`--vit-batch`), so that it runs on a CPU; its crops are made
  batch-wise by the device augmentation path (the recipe itself augments in loader workers).
One step is timed in phases with synchronised timers: data (the batch-wise multi-crop
augmentation of uint8 images), student forward, teacher forward, objective (Sinkhorn target +
source cross-entropy), backward, optimiser + EMA (the optimiser step, whose post-step hook is the
teacher's EMA, and zeroing the gradients), rest (per-step schedules and the loss read-back that the
health check does). In the same rounds, a backbone-only step runs: the same data, student and
optimiser with a trivial loss (mean square of the embeddings) and no teacher, so that "BAM /
backbone-only" is the cost of BAM over training the bare encoder. Every round runs one step of
each (round-robin), so load from other processes on a shared machine affects both alike; the
table holds per-phase medians over `--repeats` rounds after `--warmup` untimed rounds.

Whole-run split (`--run-epochs`, 0 = skip): the demo recipe through `bam pretrain` in this process,
with the process's CPU time (user + system, all threads) and wall time attributed to: training
(the epoch loop: loading, augmentation, steps), k-NN evaluations (the periodic and final online
k-NN of the trained backbone), baselines (random-init CNN and raw pixels), BN re-estimation,
checkpointing, plots, and the rest (start-up, data set loading, Lightning's set-up and tear-down).
CPU-seconds are what the demo's recorded figures use (docs/results-demo.md): on a shared machine they vary much less than
wall time.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from timm.optim import create_optimizer_v2

REPO = Path(__file__).resolve().parents[2]
PHASES = ("data", "student forward", "teacher forward", "objective", "backward", "optimiser + EMA", "rest")
BACKBONE_ONLY_PHASES = ("data", "student forward", "objective", "backward", "optimiser + EMA", "rest")
GLOBAL_ONLY = "bam, global-crops-only teacher"
RUN_PARTS = ("training", "k-NN evaluations", "baselines", "BN re-estimation", "checkpointing", "plots", "rest")


@dataclass(frozen=True)
class StepShape:
    """A shipped recipe and the command-line overrides that shrink it to a benchmark size."""

    name: str
    config: str
    overrides: tuple[str, ...]
    base_size: int  # side of the uint8 images the augmentation crops from


def shapes(vit_sizes: tuple[int, int], vit_batch: int, demo_batch: int | None = None) -> dict[str, StepShape]:
    global_size, local_size = vit_sizes
    demo = () if demo_batch is None else (f"--data.init_args.batch_size={demo_batch}",)
    vit = (
        "--data.class_path=bam.data.BuiltinDataModule", "--data.init_args.augment_on=device",
        f"--data.init_args.batch_size={vit_batch}", f"--data.init_args.crops.global_size={global_size}",
        f"--data.init_args.crops.local_size={local_size}", f"--model.init_args.backbone_kwargs.img_size={global_size}",
        "--contrastive_crop.enabled=false",
    )
    return {
        "demo": StepShape("demo", "configs/pretrain/demo.yaml", demo, 28),
        "vit_small": StepShape("vit_small", "configs/pretrain/vit_small_patch16.yaml", vit, global_size),
    }


def build(shape: StepShape, run_dir: str) -> tuple[Any, Any]:
    """(BAM module, data module) of the recipe, as `bam pretrain` instantiates them."""
    from bam.pretrain import pretrain_cli

    trainer = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1",
               "--trainer.strategy=auto", "--trainer.precision=32-true", f"--trainer.default_root_dir={run_dir}"]
    cli = pretrain_cli(["--config", str(REPO / shape.config), *shape.overrides, *trainer], run=False)
    return cli.model, cli.datamodule


def optimiser(model: Any, with_ema: bool) -> torch.optim.Optimizer:
    """The method's optimiser over the student (see `SSLMethod.configure_optimizers`), with the
    teacher's EMA as its post-step hook when `with_ema`."""
    hp = model.hparams
    optimizer = create_optimizer_v2(model.student, hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay)
    if with_ema and model.teacher is not None:
        # the EMA's cost at the recipe's momentum (the schedule needs a Trainer's step budget)
        optimizer.register_step_post_hook(lambda *_: model.move_teacher(hp.teacher_momentum))
    return optimizer


class PhaseClock:
    """Seconds per phase: on CUDA wall time, synchronising the device at each boundary so that
    asynchronous kernels are charged to the phase that launched them; on CPU this process's CPU
    time (all threads), which on a shared machine does not count the time other jobs held the cores."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.now = time.perf_counter if device.type == "cuda" else time.process_time
        self.times: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = self.now()
        yield
        self._sync()
        self.times[name] = self.times.get(name, 0.0) + self.now() - start


def train_step(model: Any, augment: Callable, images: torch.Tensor, optimizer: torch.optim.Optimizer,
               clock: PhaseClock, step: int, bam: bool) -> None:
    """One step in timed phases: BAM's (`bam`), or the backbone-only one, whose trivial loss (the
    mean square of the student's embeddings) touches every embedding and costs nothing, and which
    has no teacher (its optimiser has no EMA hook)."""
    with clock.phase("data"):
        crops = augment(images)
    with clock.phase("student forward"):
        student = model.student(crops)
    if bam:
        with clock.phase("teacher forward"):
            teacher = model.teacher_embeddings(model.teacher_inputs(crops))
    with clock.phase("objective"):
        loss = model.loss_fn(student, teacher) if bam else student.square().mean()
    with clock.phase("backward"):
        loss.backward()
    with clock.phase("optimiser + EMA"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with clock.phase("rest"):
        if bam:
            model.on_schedule(step)
        model.loss_monitor.update(loss.item(), step, model.chance_level(len(crops[0])))


def time_steps(model: Any, data: Any, base_size: int, device: torch.device, repeats: int,
               warmup: int) -> dict[str, dict[str, float]]:
    """Median seconds per phase of the BAM step and of the backbone-only step."""
    model.to(device).train()
    # each step has its own weights and optimiser state: they never interact
    global_only = copy.deepcopy(model)
    global_only.loss_fn.objective = dataclasses.replace(global_only.loss_fn.objective, balance_local_rows=False)
    steps = {"bam": (model, True), GLOBAL_ONLY: (global_only, True), "backbone only": (copy.deepcopy(model), False)}
    optimisers = {kind: optimiser(module, with_ema=bam) for kind, (module, bam) in steps.items()}
    augment = data.device_augment.to(device)
    images = torch.randint(0, 256, (data.batch_size, 3, base_size, base_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    rounds: dict[str, list[dict[str, float]]] = {kind: [] for kind in steps}
    for index in range(warmup + repeats):
        for kind, (module, bam) in steps.items():  # round-robin: load drifts affect every kind alike
            clock = PhaseClock(device)
            train_step(module, augment, images, optimisers[kind], clock, index, bam=bam)
            if index >= warmup:
                rounds[kind].append(clock.times)
    return {kind: _medians(times) for kind, times in rounds.items()}


def _medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    medians = {name: statistics.median(times[name] for times in rounds) for name in rounds[0]}
    medians["step"] = statistics.median(sum(times.values()) for times in rounds)
    return medians


def describe_shape(shape: StepShape, model: Any, data: Any) -> str:
    crops = data.crops
    return (f"{shape.name}: {model.hparams.backbone}, batch {data.batch_size}, {crops.num_global_crops}x"
            f"{crops.global_size} + {crops.num_local_crops}x{crops.local_size} px crops, projector "
            f"{model.projector_settings.hidden_dim}/{model.projector_settings.out_dim}, top-k {model.loss_fn.objective.top_k}")


def print_step_table(title: str, result: dict[str, dict[str, float]]) -> None:
    bam, bare = result["bam"], result["backbone only"]
    print(f"\n{title}")
    print(f"{'phase':<18} {'BAM ms':>9} {'share':>7} {'backbone-only ms':>17}")
    for name in PHASES:
        bare_ms = f"{1000 * bare[name]:>17.1f}" if name in bare else f"{'-':>17}"
        print(f"{name:<18} {1000 * bam[name]:>9.1f} {bam[name] / bam['step']:>6.1%} {bare_ms}")
    print(f"{'step':<18} {1000 * bam['step']:>9.1f} {1:>6.0%} {1000 * bare['step']:>17.1f}")
    extra = {name: bam[name] - bare.get(name, 0.0) for name in PHASES}
    print(f"BAM step / backbone-only step: {bam['step'] / bare['step']:.2f}x "
          f"(overhead {bam['step'] / bare['step'] - 1:+.0%} of the backbone-only step; by phase, as a share "
          "of it: " + ", ".join(f"{name} {extra[name] / bare['step']:+.0%}" for name in PHASES) + ")")
    cheaper = result[GLOBAL_ONLY]
    print(f"BAM with a global-crops-only teacher (objective.balance_local_rows: false) / backbone-only step: "
          f"{cheaper['step'] / bare['step']:.2f}x (teacher forward {1000 * cheaper['teacher forward']:.1f} ms)")


# ------------------------------------------------------------------------------ whole demo run
class RunLedger:
    """CPU seconds (this process, all threads) and wall seconds charged to the parts of a run.

    Nested charges go to the outermost part only (e.g. a checkpoint saved inside an epoch-end hook)."""

    def __init__(self) -> None:
        self.cpu = dict.fromkeys(RUN_PARTS, 0.0)
        self.wall = dict.fromkeys(RUN_PARTS, 0.0)
        self._depth = 0

    def wrap(self, owner: type, method: str, part: str) -> Callable[[], None]:
        """Charge every call of `owner.method` to `part`; returns the function that undoes it."""
        original = getattr(owner, method)

        def charged(*args: Any, **kwargs: Any) -> Any:
            with self.charge(part):
                return original(*args, **kwargs)

        setattr(owner, method, charged)
        return lambda: setattr(owner, method, original)

    @contextlib.contextmanager
    def charge(self, part: str) -> Iterator[None]:
        self._depth += 1
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.cpu[part] += time.process_time() - cpu
                self.wall[part] += time.perf_counter() - wall


def time_demo_run(epochs: int, extra_args: list[str]) -> RunLedger:
    """The demo through `bam pretrain` in this process, its time split by part."""
    from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop

    from bam.callbacks import CurvePlots, OnlineKNN, PreciseBatchNorm
    from bam.pretrain import main
    from bam.training import RunCheckpoint

    ledger = RunLedger()
    undo = [
        ledger.wrap(_TrainingEpochLoop, "advance", "training"),
        ledger.wrap(OnlineKNN, "on_train_epoch_end", "k-NN evaluations"),
        ledger.wrap(OnlineKNN, "_evaluate_baselines", "baselines"),
        ledger.wrap(PreciseBatchNorm, "on_train_epoch_end", "BN re-estimation"),
        ledger.wrap(RunCheckpoint, "_save_checkpoint", "checkpointing"),
        ledger.wrap(CurvePlots, "on_fit_end", "plots"),
    ]
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            main(["--config", str(REPO / "configs/pretrain/demo.yaml"), f"--trainer.max_epochs={epochs}",
                  f"--trainer.default_root_dir={run_dir}", "--trainer.enable_progress_bar=false", *extra_args])
    finally:
        for restore in undo:
            restore()
    ledger.cpu["rest"] = time.process_time() - cpu - sum(ledger.cpu.values())
    ledger.wall["rest"] = time.perf_counter() - wall - sum(ledger.wall.values())
    return ledger


def print_run_table(ledger: RunLedger, epochs: int) -> None:
    total_cpu, total_wall = sum(ledger.cpu.values()), sum(ledger.wall.values())
    print(f"\nWhole demo run ({epochs} epochs, `bam pretrain` in this process): CPU = user + system, all threads")
    print(f"{'part':<18} {'CPU s':>8} {'CPU share':>10} {'wall s':>8}")
    for part in RUN_PARTS:
        print(f"{part:<18} {ledger.cpu[part]:>8.1f} {ledger.cpu[part] / total_cpu:>9.1%} {ledger.wall[part]:>8.1f}")
    print(f"{'total':<18} {total_cpu:>8.1f} {1:>9.0%} {total_wall:>8.1f}   (CPU / wall = {total_cpu / total_wall:.2f} cores busy)")


def main(step_shapes: list[str], repeats: int = 10, warmup: int = 2, device: str = "cpu", threads: int | None = None,
         vit_sizes: tuple[int, int] = (64, 32), vit_batch: int = 64, demo_batch: int | None = None,
         run_epochs: int = 0, run_args: list[str] | None = None) -> dict[str, Any]:
    """Print the tables; return {shape: step medians} and, when run, {"run": ledger}."""
    from bam.warning_filters import expected_warnings_silenced

    if threads:
        torch.set_num_threads(threads)
    target = torch.device(device)
    clock = "wall time, synchronised" if target.type == "cuda" else "CPU time of this process"
    print(f"device {device} ({clock}), {torch.get_num_threads()} CPU threads, torch {torch.__version__}; "
          f"{repeats} timed rounds after {warmup} warm-up rounds, medians")
    results: dict[str, Any] = {}
    catalogue = shapes(vit_sizes, vit_batch, demo_batch)
    with expected_warnings_silenced():
        for name in step_shapes:
            shape = catalogue[name]
            with tempfile.TemporaryDirectory() as run_dir:
                model, data = build(shape, run_dir)
            results[name] = time_steps(model, data, shape.base_size, target, repeats, warmup)
            print_step_table(describe_shape(shape, model, data), results[name])
    if run_epochs:
        results["run"] = time_demo_run(run_epochs, list(run_args or []))
        print_run_table(results["run"], run_epochs)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", default=["demo", "vit_small"], choices=["demo", "vit_small"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--vit-sizes", type=int, nargs=2, default=(64, 32), metavar=("GLOBAL", "LOCAL"))
    parser.add_argument("--vit-batch", type=int, default=64)
    parser.add_argument("--demo-batch", type=int, default=None, help="default: the demo recipe's")
    parser.add_argument("--run-epochs", type=int, default=0, help="also split a whole demo run of this many epochs")
    parser.add_argument("--run-args", nargs=argparse.REMAINDER, default=[],
                        help="extra `bam pretrain` arguments for the whole run (last on the line)")
    args = parser.parse_args()
    main(args.shapes, args.repeats, args.warmup, args.device, args.threads, tuple(args.vit_sizes), args.vit_batch,
         args.demo_batch, args.run_epochs, args.run_args)
