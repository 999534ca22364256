"""Forward+backward time and peak memory of BAMLoss next to a per-pair-loop baseline and the floor.

Run: `python tests/benchmarks/bench_loss.py [--batch 128] [--dims 1024 128] [--repeats 30]
[--threads N] [--device cpu|cuda]`. Not a test: nothing here asserts a time; the table says whether
the targets (time beyond the floor at most half the loop's, peak memory no higher than the
loop's) are met on the machine at hand.

Shape: the authors' per-GPU recipe scaled to CPU: B images per crop, 2 global + 6 local crops,
2 target crops, top-k 128, reg 0.05, temperature 0.1, 3 Sinkhorn iterations, no teacher (the
no-teacher case is the heavier one: the gradient also flows through the target columns).

Three variants, each timed as one forward+backward from un-normalised `(V*B, D)` embeddings:
- floor: `normalize` + `z @ K^T` and its backward (seeded with a fixed upstream gradient). Every
  BAM implementation has to do this; at large D the matmul dominates. What an implementation of
  the objective controls is the time *beyond* this floor. (Its similarity matrix stays alive
  through its backward, as the output of the step, whereas a loss frees it early: at large D, where
  the normalise backward sets the peak, the floor's peak can exceed a loss's by that one matrix.)
- loop: a straightforward implementation the way a research codebase would write it: exp-domain
  Sinkhorn following the spec (subtract max, exp, divide by the sum, column/row normalisations,
  final row normalisation), top-k, masked log-softmax, and a Python loop over the (target, source)
  view pairs summing each pair's cross-entropy. Its loss is checked against BAMLoss's below.
- ours: `bam.losses.BAMLoss`.

Timing: one CPU thread by default (`--threads`): the objective's matrices are small, and on a
shared or small machine multi-threaded timings swing by several times from run to run (all
variants always run under the same setting). `--warmup` untimed rounds, then `--repeats` rounds;
in each round every variant runs once (round-robin), so load from other processes on a shared
machine affects them alike. "time ms" is the median per variant; "beyond floor" is the median over rounds of (variant - floor) within the
same round, which cancels most of the drift (at D=1024 the floor is ~90% of the total, and the
difference of two independent medians would be mostly noise). CPU timings include the cost of
first-touching freshly allocated pages, which a VM can make large; fewer fresh matrices is part of
what makes an implementation fast there (on CUDA the caching allocator hides it).

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` above the memory held before the step. On
CPU there is no allocator high-water mark, and RSS is dominated by the allocator's caching and
the interpreter, so it cannot resolve megabyte differences; instead one extra forward+backward
runs under `torch.profiler` with `profile_memory=True`, and the peak of the running sum of every
tensor allocation and free it records (the live tensor bytes allocated by the step, including
autograd's saved tensors, temporaries and gradients) is reported. That is the same quantity
`max_memory_allocated` measures on CUDA. Frees of blocks that existed before the step are ignored
and `x.grad` is cleared first, so each number is what the step adds. It relies on the profiler's
event tree, a semi-private API; if that is unavailable, memory is reported as n/a (nan).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from bam.losses import BAMLoss


@dataclass(frozen=True)
class Shape:
    batch: int = 128
    dim: int = 1024
    num_crops: int = 8
    num_global: int = 2
    num_target: int = 2
    top_k: int = 128
    reg: float = 0.05
    temperature: float = 0.1
    iterations: int = 3


# --- the variants ----------------------------------------------------------------------------------


def floor_forward(x: torch.Tensor, shape: Shape) -> torch.Tensor:
    """normalise + similarities: the work every BAM implementation does (backward seeded by the
    caller with a fixed upstream gradient, after this function's locals are gone, as for a loss)."""
    z = F.normalize(x, dim=1)
    return z @ z[: shape.num_target * shape.batch].T


def loop_loss(x: torch.Tensor, shape: Shape) -> torch.Tensor:
    """A plain, honest implementation of the spec with a Python loop over view pairs."""
    b, v_all, g, t_all = shape.batch, shape.num_crops, shape.num_global, shape.num_target
    z = F.normalize(x, dim=1)
    similarity = z @ z[: t_all * b].T
    n = similarity.shape[1]
    rows, cols = torch.arange(v_all * b, device=x.device), torch.arange(n, device=x.device)
    mask = (rows[:, None] % b) == (cols[None, :] % b)  # the row's own image in every target crop

    with torch.no_grad():  # the balanced target, step 5, in the exp domain
        logits = (similarity / shape.reg).masked_fill(mask, -math.inf)
        plan = torch.exp(logits - logits.max())
        plan = plan / plan.sum()
        for _ in range(shape.iterations):
            plan = plan / plan.sum(dim=0, keepdim=True)
            plan = plan / plan.sum(dim=1, keepdim=True)
        plan = plan / plan.sum(dim=1, keepdim=True)
        targets = list(plan[: g * b].chunk(g))
        if 0 < shape.top_k < n:
            top = (sum(targets) / g).topk(shape.top_k, dim=1).indices
            keep = torch.zeros(b, n, dtype=torch.bool, device=x.device).scatter_(1, top, True)
            targets = [p * keep / (p * keep).sum(dim=1, keepdim=True) for p in targets]

    log_q = (similarity / shape.temperature).masked_fill(mask, -math.inf).log_softmax(dim=1)
    log_q = log_q.masked_fill(mask, 0.0).chunk(v_all)
    total, pairs = 0.0, 0
    for t in range(g):
        for v in range(v_all):
            if v != t:
                total = total + torch.sum(-targets[t] * log_q[v], dim=1).mean()
                pairs += 1
    return total / pairs


def make_steps(shape: Shape, x: torch.Tensor) -> tuple[dict[str, Callable[[], None]], BAMLoss]:
    """One forward+backward per call for each variant, on the same leaf `x`; and our loss module."""
    upstream = torch.randn(shape.num_crops * shape.batch, shape.num_target * shape.batch, device=x.device)
    ours = BAMLoss(
        shape.num_crops,
        shape.num_global,
        num_target_crops=shape.num_target,
        reg=shape.reg,
        temperature=shape.temperature,
        sinkhorn_iterations=shape.iterations,
        top_k=shape.top_k,
    )

    def run(fn: Callable[[], torch.Tensor], seed: torch.Tensor | None = None) -> Callable[[], None]:
        def step() -> None:
            x.grad = None
            fn().backward(seed)

        return step

    return {
        "floor": run(lambda: floor_forward(x, shape), upstream),
        "loop": run(lambda: loop_loss(x, shape)),
        "ours": run(lambda: ours(x)),
    }, ours


# --- measurement -----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per step for every round, variants interleaved round-robin within a round."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def _cpu_peak_bytes(step: Callable[[], None]) -> float:
    """Peak live tensor bytes allocated during `step`, from the profiler's allocation events.

    Frees of blocks allocated before the step (the previous `x.grad`) are ignored, so the
    number is what the step itself adds on top of what was held before it."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            events.append((event.start_time_ns, fields.alloc_size, fields.ptr))
    live = peak = 0
    sizes: dict[int, int] = {}
    for _, size, ptr in sorted(events, key=lambda e: e[0]):
        if size > 0:
            sizes[ptr] = size
            live += size
        else:
            live -= sizes.pop(ptr, 0)
        peak = max(peak, live)
    return float(peak)


def peak_bytes(step: Callable[[], None], device: torch.device, x: torch.Tensor) -> float:
    """Peak memory allocated by one step above what was held before it (NaN if unmeasurable)."""
    x.grad = None  # held before the step otherwise, and freed inside it
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    try:
        return _cpu_peak_bytes(step)
    except Exception:  # the profiler's event tree is not a stable API
        return math.nan


# --- report ----------------------------------------------------------------------------------------


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}" if reference > 0 and not math.isnan(value) else "n/a"


def report(shape: Shape, samples: dict[str, list[float]], memory: dict[str, float]) -> dict[str, float]:
    """Print one table and return the two ratios the targets are about.

    Time beyond the floor is the median over rounds of (variant - floor) *in the same round*:
    pairing cancels most of the drift a shared machine adds to both.
    """
    ms = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
    extra = {
        name: statistics.median(v - f for v, f in zip(values, samples["floor"])) * 1e3
        for name, values in samples.items()
    }
    mib = {name: value / 2**20 for name, value in memory.items()}
    rows, columns = shape.num_crops * shape.batch, shape.num_target * shape.batch
    print(f"\nD={shape.dim}: B={shape.batch} per crop x {shape.num_crops} crops = {rows} rows, "
          f"N={columns} columns, top-k {shape.top_k}")
    header = ("time ms", 10), ("beyond floor", 14), ("/ loop", 8), ("peak MiB", 11), ("beyond floor", 14), ("/ loop", 8)
    print("  " + " " * 6 + "".join(f"{text:>{width}}" for text, width in header))
    for name in ("floor", "loop", "ours"):
        if name == "floor":
            print(f"  {name:<6}{ms[name]:>10.3f}{'':>22}{mib[name]:>11.3f}")
            continue
        print(f"  {name:<6}{ms[name]:>10.3f}{extra[name]:>14.3f}{_ratio(extra[name], extra['loop']):>8}"
              f"{mib[name]:>11.3f}{mib[name] - mib['floor']:>14.3f}{_ratio(mib[name], mib['loop']):>8}")
    time_ratio = extra["ours"] / extra["loop"] if extra["loop"] > 0 else math.nan
    memory_ratio = mib["ours"] / mib["loop"]
    time_ok, memory_ok = time_ratio <= 0.5, not memory_ratio > 1.0  # NaN (unmeasured) is no miss
    print(f"  targets: time beyond floor <= 0.5 x loop's: {time_ratio:.2f} {'PASS' if time_ok else 'MISS'}; "
          f"peak memory <= loop's: {memory_ratio:.2f} {'PASS' if memory_ok else 'MISS'}")
    return {"time_ratio": time_ratio, "memory_ratio": memory_ratio}


def main(
    batch: int = 128,
    dims: tuple[int, ...] = (1024, 128),
    repeats: int = 30,
    warmup: int = 5,
    threads: int = 1,
    device: str | None = None,
) -> dict[int, dict[str, float]]:
    """Benchmark every D; returns `{D: {"time_ratio", "memory_ratio"}}` (ours / loop, beyond floor
    for time, absolute peak for memory). `threads=0` keeps torch's thread count; any other value
    applies for the duration of the call only."""
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(batch, dims, repeats, warmup, device)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    batch: int, dims: tuple[int, ...], repeats: int, warmup: int, device: str | None
) -> dict[int, dict[str, float]]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {repeats} after {warmup} warm-up")
    results = {}
    for dim in dims:
        shape = Shape(batch=batch, dim=dim, top_k=min(128, batch))
        x = torch.randn(shape.num_crops * batch, dim, generator=torch.Generator().manual_seed(dim)).to(dev)
        x.requires_grad_()
        steps, ours = make_steps(shape, x)
        with torch.no_grad():  # honesty check: the baseline computes the same objective
            agree = torch.allclose(loop_loss(x, shape), ours(x), rtol=1e-4, atol=1e-5)
        if not agree:
            raise RuntimeError("the loop baseline disagrees with BAMLoss; the comparison would be meaningless")
        samples = time_steps(steps, dev, warmup, repeats)
        memory = {name: peak_bytes(step, dev, x) for name, step in steps.items()}
        results[dim] = report(shape, samples, memory)
    return results


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="images per crop")
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 128])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; 0 keeps torch's default (default: 1)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return parser.parse_args()


if __name__ == "__main__":
    args = _parse()
    main(args.batch, tuple(args.dims), args.repeats, args.warmup, args.threads, args.device)
