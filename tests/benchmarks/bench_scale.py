"""Per-process memory and time of the BAM objective as the number of processes W grows.

Run: `python tests/benchmarks/bench_scale.py [--dims 256 512 1024] [--blocks 256 512] [--repeats 3]`.

Shape: the released recipe per process, B=256 images, V=8 crops (2 global + 6 local), T=2 target
crops, top-k 128, 3 Sinkhorn iterations, with a momentum teacher. Every process holds
`(V*B) x (T*B*W)` matrices, so the objective's memory grows linearly with W. For W = 1, 2, 4 gloo
processes on CPU, each process measures one forward+backward of `bam_loss` unblocked and in column blocks of C
(`column_block_size=C`): peak live tensor bytes allocated by the step (the
quantity CUDA's `max_memory_allocated` reports; on CPU from the profiler's allocation events, see
`bench_loss.py`) and the median wall time.

The exact formula. The sequence of operations, and so which tensors are alive after each one,
does not depend on W (>= 2), D or C; only the tensors' sizes do. So one extra run (W = 3 processes, D = 320, C = 768: sizes chosen so that every
dimension that scales, N = T*B*W, D, C and k + C, has a value no other dimension has) records,
after every operation of one forward+backward, the shapes of all tensors the step has allocated and
not yet freed (a `TorchDispatchMode` that sees every aten operation, backward included). Each
dimension is then a known function of (W, D, C), each live set's size a polynomial in them, and
the peak at any (W, D, C) is the largest live set evaluated there: exact for this code path (W >= 2;
W = 1 skips the gather). The script checks it against the profiler at every measured point and
evaluates it at W = 16 (the authors' run: 16 GPUs x 256), 64, 256 and 1024 with D = 4096 (the
recipe's projector output) and C = 8192, and prints what is alive at the largest peak. It counts
tensors, as `max_memory_allocated` does, not workspace that a kernel allocates internally (the CPU
profiler sees some in large matrix products, so it may read a few MiB higher). One approximation:
`bam_loss`'s gather receives into W separate buffers, which the trace has 3 of; at that moment at
most 2 N x D + 2 R x D floats are alive, below the peak at every W in the table.

Times are CPU times on this machine with W processes sharing its cores: they show the blocked
form's extra cost (about 4 times the matrix-product work), not GPU speed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench_loss import peak_bytes  # same directory

from bam.losses import bam_loss

BATCH, CROPS, GLOBAL, TARGET, TOP_K, ITERATIONS = 256, 8, 2, 2, 128, 3
ROWS = CROPS * BATCH
RECIPE_DIM, TABLE_BLOCK, BUDGET = 4096, 8192, 2 * 2**30
EXTRAPOLATE = (16, 64, 256, 1024)
TRACE_WORLD, TRACE_DIM, TRACE_BLOCK = 3, 320, 768  # every scaling dimension gets a value of its own
GIB, MIB = 2**30, 2**20


def objective(block: int | None) -> Callable[..., torch.Tensor]:
    kwargs = dict(num_crops=CROPS, num_global_crops=GLOBAL, num_target_crops=TARGET, top_k=TOP_K,
                  sinkhorn_iterations=ITERATIONS)
    return lambda student, teacher: bam_loss(student, teacher, column_block_size=block or 0, **kwargs)


def inputs(dim: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    student = torch.randn(ROWS, dim, generator=generator).requires_grad_()
    return student, torch.randn(ROWS, dim, generator=generator)


# --------------------------------------------------------------------------- measurement
def measure(dim: int, block: int | None, repeats: int, rank: int) -> dict[str, float]:
    student, teacher = inputs(dim, rank)
    loss_fn = objective(block)

    def step() -> None:
        loss_fn(student, teacher).backward()

    step()  # warm-up
    peak = peak_bytes(step, torch.device("cpu"), student)
    times = []
    for _ in range(repeats):
        student.grad = None
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"peak": peak, "time": statistics.median(times)}


class LiveTensors(TorchDispatchMode):
    """After every aten operation: the tensors allocated since entering and still alive."""

    def __init__(self, *existing: torch.Tensor) -> None:
        super().__init__()
        self.existing = {tensor.untyped_storage()._cdata for tensor in existing}  # views of these are not new
        self.alive: dict[int, tuple[StorageWeakRef, int]] = {}  # storage -> (weak ref, allocation)
        self.allocations: list[tuple[list[int], int]] = []  # (shape, bytes per element)
        self.live_sets: list[list[int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.alive = {key: entry for key, entry in self.alive.items() if not entry[0].expired()}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes() > 0:
                self._register(tensor)
        self.live_sets.append([index for _, index in self.alive.values()])
        return out

    def _register(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage._cdata in self.alive or storage._cdata in self.existing:  # a view or an in-place result
            return
        whole = tensor.numel() * tensor.element_size() == storage.nbytes()
        shape = list(tensor.shape) if whole else [storage.nbytes()]
        self.alive[storage._cdata] = (StorageWeakRef(storage), len(self.allocations))
        self.allocations.append((shape, tensor.element_size() if whole else 1))


def trace(block: int | None) -> dict[str, Any]:
    """The live sets of one forward+backward at the trace sizes (inputs excluded, as measured)."""
    student, teacher = inputs(TRACE_DIM, dist.get_rank())
    loss_fn = objective(block)
    with LiveTensors(student, teacher) as live:
        loss_fn(student, teacher).backward()
    return {"allocations": live.allocations, "live_sets": live.live_sets}


def worker(rank: int, world: int, init_file: str, out: str, dims: list[int], blocks: list[int], repeats: int) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if world == TRACE_WORLD:
            result: Any = {"unblocked": trace(None), "blocked": trace(TRACE_BLOCK)}
        else:
            result = [{"world": world, "dim": dim, "block": block, **measure(dim, block, repeats, rank)}
                      for dim in dims for block in [None, *blocks]]
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def launch(world: int, tmp: Path, dims: list[int], blocks: list[int], repeats: int) -> list[Any]:
    folder = tmp / f"w{world}"
    folder.mkdir()
    mp.spawn(worker, args=(world, str(folder / "init"), str(folder), dims, blocks, repeats), nprocs=world)
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world)]


def measurements(per_rank: list[list[dict]]) -> list[dict]:
    """Each number is the maximum over the processes."""
    return [{**rows[0], "peak": max(r["peak"] for r in rows), "time": max(r["time"] for r in rows)}
            for rows in zip(*per_rank)]


# --------------------------------------------------------------------------- the formula
def dimension(size: int) -> Callable[[int, int, int], int]:
    """What a dimension of the trace run is, as a function of (W, D, C)."""
    columns = TARGET * BATCH * TRACE_WORLD
    scaling = {
        columns: lambda w, d, c: TARGET * BATCH * w,
        TRACE_DIM: lambda w, d, c: d,
        TRACE_BLOCK: lambda w, d, c: min(c, TARGET * BATCH * w),
        TOP_K + TRACE_BLOCK: lambda w, d, c: TOP_K + min(c, TARGET * BATCH * w),
        TRACE_WORLD: lambda w, d, c: w,
    }
    return scaling.get(size, lambda w, d, c: size)


def name(size: int) -> str:
    return {TARGET * BATCH * TRACE_WORLD: "N", TRACE_DIM: "D", TRACE_BLOCK: "C", TOP_K + TRACE_BLOCK: "(k+C)",
            TRACE_WORLD: "W", ROWS: "R"}.get(size, str(size))


class Formula:
    """Peak live bytes at any (W, D, C): the largest live set of the trace, resized."""

    def __init__(self, recorded: dict[str, Any]) -> None:
        self.allocations = recorded["allocations"]
        self.live_sets = recorded["live_sets"]

    def nbytes(self, index: int, w: int, d: int, c: int) -> int:
        shape, element = self.allocations[index]
        total = element
        for size in shape:
            total *= dimension(size)(w, d, c)
        return total

    def peak_set(self, w: int, d: int, c: int) -> list[int]:
        sizes = [self.nbytes(i, w, d, c) for i in range(len(self.allocations))]
        return max(self.live_sets, key=lambda live: sum(sizes[i] for i in live))

    def peak(self, w: int, d: int, c: int | None) -> int:
        c = c or 0
        return sum(self.nbytes(i, w, d, c) for i in self.peak_set(w, d, c))

    def describe(self, w: int, d: int, c: int | None) -> str:
        """The tensors alive at the peak, grouped by symbolic shape, largest first."""
        c = c or 0
        groups: Counter[str] = Counter()
        size_of: dict[str, int] = {}
        for index in self.peak_set(w, d, c):
            shape, element = self.allocations[index]
            label = " x ".join(name(size) for size in shape) + ("" if element == 4 else f" ({element} B)")
            groups[label] += 1
            size_of[label] = self.nbytes(index, w, d, c)
        ordered = sorted(groups, key=lambda label: -size_of[label] * groups[label])
        return " + ".join(f"{groups[label]} x [{label}]" for label in ordered if size_of[label] * groups[label] >= MIB)


# --------------------------------------------------------------------------- report
def report(points: list[dict], formulas: dict[str, Formula]) -> None:
    print("Measured: per process (maximum over processes), peak MiB [formula] and seconds per step")
    print("| W | D | form | peak MiB [formula] | time s |")
    print("|---|---|---|---|---|")
    for p in points:
        form = "unblocked" if p["block"] is None else f"blocks of {p['block']}"
        formula = formulas["unblocked" if p["block"] is None else "blocked"]
        predicted = f"{formula.peak(p['world'], p['dim'], p['block']) / MIB:.1f}" if p["world"] >= 2 else "-"
        print(f"| {p['world']} | {p['dim']} | {form} | {p['peak'] / MIB:.1f} [{predicted}] | {p['time']:.2f} |")

    print(f"\nExtrapolated with the formula: B={BATCH}, V={CROPS}, T={TARGET}, D={RECIPE_DIM}, per process")
    print(f"| W | N = T*B*W | one (V*B) x N matrix | N x D target embeddings | objective, unblocked | "
          f"objective, blocks of {TABLE_BLOCK} | unblocked > 2 GiB |")
    print("|---|---|---|---|---|---|---|")
    for world in (2, 4, *EXTRAPOLATE):
        columns = TARGET * BATCH * world
        full = formulas["unblocked"].peak(world, RECIPE_DIM, None)
        blocked = formulas["blocked"].peak(world, RECIPE_DIM, TABLE_BLOCK)
        print(f"| {world} | {columns} | {4 * ROWS * columns / GIB:.3f} GiB | {4 * columns * RECIPE_DIM / GIB:.3f} GiB "
              f"| {full / GIB:.2f} GiB | {blocked / GIB:.2f} GiB | {'yes' if full > BUDGET else 'no'} |")
    world = EXTRAPOLATE[-1]
    for label, block in (("unblocked", None), ("blocked", TABLE_BLOCK)):
        print(f"\nAlive at the peak, {label}, W={world} (R = V*B = {ROWS}, N = T*B*W, tensors >= 1 MiB):\n  "
              + formulas[label].describe(world, RECIPE_DIM, block))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--blocks", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", type=Path, default=Path("/tmp/bam_bench_scale"))
    args = parser.parse_args()
    if args.tmp.exists():
        sys.exit(f"{args.tmp} exists; remove it or pass --tmp")
    args.tmp.mkdir(parents=True)
    traced = launch(TRACE_WORLD, args.tmp, [], [], 0)[0]
    formulas = {form: Formula(traced[form]) for form in ("unblocked", "blocked")}
    points = []
    for world in args.worlds:
        points += measurements(launch(world, args.tmp, args.dims, args.blocks, args.repeats))
    report(points, formulas)


if __name__ == "__main__":
    main()
