"""Peak activation memory of one training step against depth: reversible chains vs the rest.

Two models written in plain PyTorch couplings (``y1 = x1 + F(x2); y2 = x2 + G(y1)``):
(a) RevNet-style conv net (F, G = conv 3x3 -> BatchNorm -> ReLU), (b) Reformer-style
transformer (F = pre-norm attention, G = pre-norm MLP). For each depth, five ways to train:

* ``eager``: the module as written;
* ``inductor``: ``torch.compile`` with its defaults (what a user compares memopt against);
* ``checkpoint``: ``torch.utils.checkpoint`` around every coupling (non-reentrant);
* ``budget-0.1``: memopt with ``reversible=False, memory_budget=0.1`` (the min-cut
  partitioner told to keep 10% of the activations: the stock compiler's best effort);
* ``memopt-reversible``: memopt with its default ``reversible="auto"`` (each chain traced
  into the forward and backward graphs, which the lowering fuses);
* ``memopt-reversible-op``: the same with ``reversible_inline=False``: each chain one opaque
  op that runs its steps one by one (name it in ``--variants``);
* on CUDA also ``inductor-cudagraphs`` (``mode="reduce-overhead"``) and
  ``memopt-reversible-cudagraphs`` (memopt with ``inductor_config={"triton.cudagraphs": True}``):
  replayed as CUDA graphs, which removes the host work that dominates small blocks' steps
  (name them in ``--variants``).

``peak`` = bytes allocated above the level before the step, with parameters and gradients
already allocated (gradients kept between steps and zeroed in place; no optimizer state),
measured by ``memopt.measure`` (CUDA peak statistics, or the CPU profiler's allocator
events). A compiled training graph (AOTAutograd) returns all its parameter gradients at
once before they are added into ``.grad``, so compiled variants carry one extra
gradient-sized transient that eager autograd does not; ``activation`` subtracts it
(parameter bytes) for the compiled variants, following the issue's definition "peak minus
parameters, gradients and optimizer state". ``first call`` is the wall time of the first
step: the compile, for compiled variants. Prints a markdown table and checks the targets of
issue 4.

    python benchmarks/reversible.py                      # CPU: small sizes, eager lowering
    python benchmarks/reversible.py --lowering inductor  # what a GPU run uses by default
    python benchmarks/reversible.py --lowering inductor --draw-sweep  # dropout: states or seeds, by size
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import memopt


def dropout(p: float) -> list[nn.Module]:
    # No module at p = 0: the models stay exactly the ones earlier results measured.
    return [nn.Dropout(p)] if p else []


class ConvBranch(nn.Sequential):
    def __init__(self, channels: int, p: float = 0.0) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(), *dropout(p)
        )


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, p: float = 0.0) -> None:
        super().__init__()
        self.norm, self.qkv, self.proj, self.heads = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width), heads
        self.dropout = nn.Sequential(*dropout(p))

    def forward(self, x):
        batch, tokens, width = x.shape
        q, k, v = self.qkv(self.norm(x)).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.dropout(self.proj(out.transpose(1, 2).reshape(batch, tokens, width)))


class MLP(nn.Sequential):
    def __init__(self, width: int, p: float = 0.0) -> None:
        super().__init__(
            nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), *dropout(p), nn.Linear(4 * width, width)
        )


class Couplings(nn.Module):
    """``depth`` couplings on the two halves of ``dim``; optionally checkpoint each one."""

    def __init__(self, f: list[nn.Module], g: list[nn.Module], dim: int, stem: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.f, self.g, self.dim, self.stem, self.head = nn.ModuleList(f), nn.ModuleList(g), dim, stem, head
        self.use_checkpoint = False

    @staticmethod
    def _coupling(f, g, x1, x2):
        x1 = x1 + f(x2)
        x2 = x2 + g(x1)
        return x1, x2

    def forward(self, x):
        x1, x2 = self.stem(x).chunk(2, dim=self.dim)
        for f, g in zip(self.f, self.g):
            if self.use_checkpoint:
                x1, x2 = checkpoint(self._coupling, f, g, x1, x2, use_reentrant=False)
            else:
                x1, x2 = self._coupling(f, g, x1, x2)
        return self.head(torch.cat([x1, x2], dim=self.dim))


def revnet(depth: int, channels: int, p: float = 0.0) -> Couplings:
    stem = nn.Conv2d(3, 2 * channels, 3, padding=1)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * channels, 10))
    return Couplings(
        [ConvBranch(channels, p) for _ in range(depth)], [ConvBranch(channels, p) for _ in range(depth)], 1, stem, head
    )


def reformer(depth: int, width: int, heads: int, p: float = 0.0) -> Couplings:
    stem = nn.Linear(16, 2 * width)
    head = nn.Linear(2 * width, 10)
    return Couplings(
        [Attention(width, heads, p) for _ in range(depth)], [MLP(width, p) for _ in range(depth)], -1, stem, head
    )


VARIANTS = ("eager", "inductor", "checkpoint", "budget-0.1", "memopt-reversible")
OTHER_VARIANTS = ("memopt-reversible-op",)
CUDA_GRAPH_VARIANTS = ("inductor-cudagraphs", "memopt-reversible-cudagraphs")


# Compiled variants carry a gradient-sized transient (see the module docstring).
COMPILED = ("inductor", "budget-0.1", "memopt-reversible", *OTHER_VARIANTS, *CUDA_GRAPH_VARIANTS)


def build(variant: str, model: Couplings, lowering: str, budget_lowering: str):
    model.use_checkpoint = variant == "checkpoint"
    if variant == "budget-0.1":
        return memopt.compile(model, lowering=budget_lowering, reversible=False, memory_budget=0.1)
    if variant == "memopt-reversible":
        return memopt.compile(model, lowering=lowering)
    if variant == "memopt-reversible-op":
        return memopt.compile(model, lowering=lowering, reversible_inline=False)
    if variant == "inductor":
        return torch.compile(model)
    if variant == "inductor-cudagraphs":
        return torch.compile(model, mode="reduce-overhead")
    if variant == "memopt-reversible-cudagraphs":
        return memopt.compile(model, lowering=lowering, inductor_config={"triton.cudagraphs": True})
    if variant not in VARIANTS:
        valid = VARIANTS + OTHER_VARIANTS + CUDA_GRAPH_VARIANTS
        raise SystemExit(f"--variants: unknown {variant!r}; valid: {', '.join(valid)}")
    return model


def measure_step(
    fn, model: nn.Module, x: torch.Tensor, repeat: int, graphs: bool = False
) -> tuple[int, float, float]:
    """Peak bytes and time of one training step, and the wall time of the first step (the
    compile, for compiled variants). ``graphs``: ``fn`` replays CUDA graphs, whose replays
    allocate nothing (their memory came from the graph pool while recording), so the peak is
    read over the calls that compile, warm up and record instead."""

    def step():
        out = fn(x)
        out.float().square().mean().backward()

    if graphs:
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    begin = time.perf_counter()
    step()  # compile, and allocate every .grad so the measured peak holds activations only
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    first_call = time.perf_counter() - begin
    for p in model.parameters():
        p.grad.zero_()
    if graphs:
        step()  # record
        torch.cuda.synchronize()
        # The .grad tensors were allocated inside this window: take them out again.
        grads = sum(p.numel() * p.element_size() for p in model.parameters())
        peak = torch.cuda.max_memory_allocated() - start - grads
        return peak, memopt.measure(step, warmup=1, repeat=repeat, device="cuda").time_s, first_call
    result = memopt.measure(step, warmup=1, repeat=repeat, device=x.device.type)
    if x.device.type == "cuda":
        return result.peak_bytes, result.time_s, first_call
    # On a shared CPU machine wall time measures the neighbours; with one intra-op thread the
    # process's CPU time measures the step's own work.
    times = []
    for _ in range(repeat):
        begin = time.process_time()
        step()
        times.append(time.process_time() - begin)
    return result.peak_bytes, statistics.median(times), first_call


DRAW_SWEEP = "1x2x4,1x4x8,1x8x16,2x16x16,4x16x16,2x16x32,4x16x32,1x64x32"
"""Default ``--draw-sweep`` shapes, batch x channels x size: 32 to 65536 elements per random op."""

DRAWS = ("states", "seeds", "auto")


@contextlib.contextmanager
def drawing(how: str):
    """Make traced random ops draw from the generator's states, Inductor's seeds, or choose
    per op as memopt does (``auto``). Both knobs are part of memopt's partitioner key, so
    Inductor's caches do not hand one kind of graph to another."""
    from memopt import reversible_inline

    saved = reversible_inline._SEEDED_DEVICES, reversible_inline._CPU_SEEDS_MAX_NUMEL
    if how == "states":
        reversible_inline._SEEDED_DEVICES, reversible_inline._CPU_SEEDS_MAX_NUMEL = frozenset(), -1
    elif how == "seeds":
        reversible_inline._SEEDED_DEVICES = saved[0] | {"cpu"}
    try:
        yield
    finally:
        reversible_inline._SEEDED_DEVICES, reversible_inline._CPU_SEEDS_MAX_NUMEL = saved


def draw_sweep(args: argparse.Namespace, device: torch.device, depth: int) -> list[str]:
    """Step time of a RevNet chain with dropout against the size of its random ops, each
    drawn from states, from seeds, or as memopt chooses: the measurement behind the size
    at which a CPU switches from seeds to states (``_CPU_SEEDS_MAX_NUMEL``)."""
    p = args.dropout or 0.1
    lines = [
        f"# reversible: random draws from RNG states or seeds ({datetime.date.today()})",
        "",
        f"device: {device.type} ({_device_name(device)}), torch {torch.__version__}; RevNet chain of depth {depth}, "
        f"dropout {p} (2 x {depth} random ops per step), memopt lowering `{args.lowering}`; step time = median of "
        f"{args.repeat} runs " + ("(CUDA wall time)" if device.type == "cuda" else "(CPU process time, 1 thread)"),
        "",
        "| batch x channels x size | elements per random op | eager (ms) | states / eager | seeds / eager "
        "| auto / eager |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    for shape in args.draw_sweep.split(","):
        try:
            batch, channels, size = (int(part) for part in shape.split("x"))
        except ValueError:
            raise SystemExit(f"--draw-sweep: {shape!r} is not batch x channels x size (like 4x16x32)") from None
        torch.manual_seed(0)
        model = revnet(depth, channels, p).to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        torch.compiler.reset()
        _, eager, _ = measure_step(model, model, x, args.repeat)
        ratios = []
        for how in DRAWS:
            torch.compiler.reset()
            with drawing(how):
                _, seconds, _ = measure_step(memopt.compile(model, lowering=args.lowering), model, x, args.repeat)
            ratios.append(f"{seconds / eager:.2f}x")
        row = f"| {shape} | {batch * channels * size * size} | {eager * 1e3:.2f} | " + " | ".join(ratios) + " |"
        lines.append(row)
        print(row, flush=True)
    return lines


def write_table(lines: list[str], path: str | None) -> None:
    """Also write the printed table to ``path`` (``--output``), when given."""
    if path:
        with open(path, "w") as handle:
            handle.write("\n".join(lines) + "\n")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--depths", default="8,16,32,64")
    parser.add_argument("--models", default="revnet,reformer")
    parser.add_argument("--lowering", default="inductor" if cuda else "eager", choices=("inductor", "eager"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--budget-lowering",
        default=None,
        choices=("inductor", "eager"),
        help="lowering of the budget-0.1 variant (default: --lowering)",
    )
    parser.add_argument(
        "--scale", default="small", choices=("small", "compute", "host"),
        help="CPU sizes: 'small' (the sweep in minutes), 'compute' (compute-bound steps; use few depths) or "
        "'host' (blocks so small that per-op host work is all there is: a stand-in for a GPU's launch-bound steps)",
    )
    parser.add_argument(
        "--dropout", type=float, default=0.0,
        help="dropout in every branch (after ReLU; after the attention projection and the MLP's GELU): one random "
        "op per step, which reversible chains draw again in the backward",
    )
    parser.add_argument(
        "--draw-sweep", nargs="?", const=DRAW_SWEEP, default=None, metavar="BxCxS,...",
        help="instead of the depth table: step time of a RevNet chain (the first of --depths; dropout --dropout, "
        "0.1 if unset) with its random ops drawn from RNG states, from Inductor's seeds, or as memopt chooses, "
        f"for each input shape (default {DRAW_SWEEP}); needs --lowering inductor",
    )
    parser.add_argument("--output", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    depths = [int(d) for d in args.depths.split(",")]
    if args.draw_sweep:
        if args.lowering != "inductor":
            parser.error("--draw-sweep compares Inductor's seeds with RNG states: add --lowering inductor")
        write_table(draw_sweep(args, device, depths[0]), args.output)
        return 0
    # CPU sizes finish the whole sweep in a few minutes on 2 cores; CUDA sizes fill a GPU better.
    if cuda:
        conv = dict(batch=32, channels=64, size=32)
        text = dict(batch=8, tokens=512, width=256, heads=8)
        # float32 streams: the pass refuses to rebuild bfloat16/float16 streams (too coarse).
        dtype = torch.float32
    elif args.scale == "compute":  # CPU sizes where the ops' own work outweighs per-op overhead
        conv = dict(batch=8, channels=32, size=32)
        text = dict(batch=4, tokens=256, width=128, heads=4)
        dtype = torch.float32
    elif args.scale == "host":
        conv = dict(batch=1, channels=2, size=4)
        text = dict(batch=1, tokens=4, width=8, heads=2)
        dtype = torch.float32
    else:
        conv = dict(batch=4, channels=8, size=16)
        text = dict(batch=4, tokens=128, width=32, heads=2)
        dtype = torch.float32

    device_name = _device_name(device)
    lines = [
        f"# reversible: activation memory of one training step vs depth ({datetime.date.today()})",
        "",
        f"device: {device.type} ({device_name}), torch {torch.__version__}, python {platform.python_version()}, "
        f"dtype {dtype}, memopt lowering `{args.lowering}` (budget-0.1: "
        f"`{args.budget_lowering or args.lowering}`), step time = median of {args.repeat} runs "
        + ("(CUDA wall time)" if cuda else "(CPU process time, 1 intra-op thread: robust to other load)"),
        f"revnet: batch {conv['batch']}, {conv['channels']}+{conv['channels']} channels, "
        f"{conv['size']}x{conv['size']}; reformer: batch {text['batch']}, {text['tokens']} tokens, "
        f"width {text['width']}+{text['width']}, {text['heads']} heads"
        + (f"; dropout {args.dropout} in every branch" if args.dropout else ""),
        "",
        "| model | depth | variant | params (MiB) | peak (MiB) | activation (MiB) | step time (ms) | time / eager "
        "| first call (s) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    results: dict[tuple[str, int, str], tuple[int, float]] = {}
    for name in args.models.split(","):
        for depth in depths:
            torch.manual_seed(0)
            if name == "revnet":
                base = revnet(depth, conv["channels"], args.dropout).to(device, dtype)
                x = torch.randn(conv["batch"], 3, conv["size"], conv["size"], device=device, dtype=dtype)
            else:
                base = reformer(depth, text["width"], text["heads"], args.dropout).to(device, dtype)
                x = torch.randn(text["batch"], text["tokens"], 16, device=device, dtype=dtype)
            for variant in args.variants.split(","):
                torch.compiler.reset()
                fn = build(variant, base, args.lowering, args.budget_lowering or args.lowering)
                try:
                    peak, seconds, first_call = measure_step(
                        fn, base, x, args.repeat, graphs=variant.endswith("-cudagraphs")
                    )
                except Exception as error:  # a variant that fails is reported, not fatal
                    message = str(error).splitlines()[0][:120]
                    row = f"| {name} | {depth} | {variant} | | failed: {type(error).__name__}: {message} | | | | |"
                    lines.append(row)
                    print(row, flush=True)
                    continue
                param_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
                activation = peak - (param_bytes if variant in COMPILED else 0)
                results[name, depth, variant] = (activation, seconds)
                eager = results.get((name, depth, "eager"))
                ratio = seconds / eager[1] if eager else float("nan")
                row = (
                    f"| {name} | {depth} | {variant} | {param_bytes / 2**20:.2f} | {peak / 2**20:.2f} | "
                    f"{activation / 2**20:.2f} | {seconds * 1e3:.1f} | {ratio:.2f} | {first_call:.1f} |"
                )
                lines.append(row)
                print(row, flush=True)

    lines += ["", "Targets (issue 4): memopt-reversible activation memory grows <= 10% from the smallest to the",
              "largest depth, is <= half of per-block checkpointing's at the largest depth, step time <= 1.4x eager.", ""]
    low, high = min(depths), max(depths)
    for name in args.models.split(","):
        needed = [(name, d, v) for d in (low, high) for v in ("memopt-reversible", "checkpoint", "eager")]
        if not all(key in results for key in needed):
            continue
        ckpt_high = results[name, high, "checkpoint"][0]
        rev_low, rev_high = results[name, low, "memopt-reversible"][0], results[name, high, "memopt-reversible"][0]
        growth = rev_high / rev_low - 1
        worst_time = max(results[name, d, "memopt-reversible"][1] / results[name, d, "eager"][1] for d in depths)
        lines.append(
            f"- {name}: growth {low}->{high}: {growth:+.1%} ({'met' if growth <= 0.10 else 'MISSED'}); "
            f"vs checkpoint at {high}: {rev_high / ckpt_high:.2f}x ({'met' if rev_high <= ckpt_high / 2 else 'MISSED'}); "
            f"worst time ratio {worst_time:.2f}x ({'met' if worst_time <= 1.4 else 'MISSED'})"
        )
        print(lines[-1], flush=True)
    write_table(lines, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
