"""Where a call's time goes: host work, GPU work and the kernels launched, per variant.

Two questions the first GPU sessions left open, answered with the CUDA profiler:

* ``monarch``: on an H100 (bfloat16, 8192 tokens, n=4096, nblocks=4) ``MonarchLinear`` took
  0.386 ms a call against 0.291 ms for its Triton kernels called directly. Does the op's path
  launch more kernels, or does its host work starve the GPU? Variants: the Triton kernels,
  ``torch.ops.memopt.monarch_matmul``, ``MonarchLinear`` and the batched-matmul reference.
* ``reversible``: memopt's training step took 1.6-3.2x eager's with the blocks of
  ``benchmarks/reversible.py``. How much of a step is host work, how much GPU work, and
  which kernels does memopt launch that eager does not? Variants: eager, memopt (chains
  traced into the graphs, the default) and memopt with ``reversible_inline=False`` (each
  chain an opaque op run step by step), both with ``--lowering`` (default Inductor).

Per variant: host time per call (``--calls`` calls issued back to back, timed before the
final synchronize: the host's own work when the GPU keeps up), wall time per call (with
the synchronize), GPU-busy time per call (sum of the profiled kernels' durations), kernels
launched per call and the most frequent kernels. Host close to wall with GPU-busy well
below it means the variant is host-bound.

    python benchmarks/gpu_profile.py                       # both, CUDA sizes
    python benchmarks/gpu_profile.py --device cpu --small  # smoke run of the script itself

On a CPU there are no kernels to list (GPU-busy and kernels read 0); ``--small`` shrinks
the shapes so the run takes seconds there (the Monarch kernels then run under
``TRITON_INTERPRET=1`` or are skipped).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

import memopt


def kernel_events(prof: torch.profiler.profile) -> list:
    """The profiled GPU kernels (and memcpy/memset activities) of ``prof``."""
    kinds = {torch.autograd.DeviceType.CUDA}
    return [e for e in prof.events() if e.device_type in kinds]


def profile_calls(fn: Callable[[], object], device: str, calls: int, warmup: int) -> dict:
    """Host, wall and GPU-busy microseconds per call of ``fn``, and its kernels per call."""
    cuda = device == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - begin
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - begin
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    kernels = kernel_events(prof) if cuda else []
    busy = sum(getattr(e, "device_time", 0.0) for e in kernels)  # microseconds
    names = collections.Counter(e.name for e in kernels)
    return {
        "host_us": host / calls * 1e6,
        "wall_us": wall / calls * 1e6,
        "gpu_us": busy / calls,
        "kernels": len(kernels) / calls,
        "top": [(name[:70], count / calls) for name, count in names.most_common(8)],
    }


def profile_or_failure(name: str, fn: Callable[[], object], args: argparse.Namespace) -> dict | str:
    """:func:`profile_calls`, or the error of a variant that fails (reported, not fatal)."""
    try:
        result = profile_calls(fn, args.device, args.calls, args.warmup)
    except Exception as error:
        result = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        print(f"{name}: {result}", file=sys.stderr, flush=True)
        return result
    print(f"{name}: {result['wall_us']:.0f} us/call", file=sys.stderr, flush=True)
    return result


def table(rows: list[tuple[str, dict | str]]) -> list[str]:
    lines = [
        "| variant | host us/call | wall us/call | GPU-busy us/call | GPU-busy / wall | kernels/call |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows:
        if isinstance(r, str):
            lines.append(f"| {name} | {r} | | | | |")
            continue
        share = r["gpu_us"] / r["wall_us"] if r["wall_us"] else 0.0
        lines.append(
            f"| {name} | {r['host_us']:.0f} | {r['wall_us']:.0f} | {r['gpu_us']:.0f} | {share:.2f} "
            f"| {r['kernels']:.1f} |"
        )
    lines.append("")
    for name, r in rows:
        if not isinstance(r, str) and r["top"]:
            kernels = "; ".join(f"{count:g}x {kernel}" for kernel, count in r["top"])
            lines.append(f"- {name}: {kernels}")
    return lines


def monarch_section(args: argparse.Namespace) -> list[str]:
    from memopt.nn import MonarchLinear
    from memopt.ops import monarch as monarch_op
    from memopt.triton_kernels.monarch import monarch_matmul_reference, monarch_matmul_triton

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n, nblocks, tokens = (64, 4, 32) if args.small else (4096, 4, 8192)
    torch.manual_seed(0)
    x = torch.randn(tokens, n, device=device, dtype=dtype)
    layer = MonarchLinear(n, n, nblocks, bias=False, device=device, dtype=dtype)
    variants: dict[str, Callable[[], object]] = {}
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        variants["triton kernels"] = lambda: monarch_matmul_triton(x, layer.w1, layer.w2)
    variants["op (torch.ops.memopt.monarch_matmul)"] = lambda: torch.ops.memopt.monarch_matmul(x, layer.w1, layer.w2)
    variants["MonarchLinear"] = lambda: layer(x)
    variants["reference (2 bmm)"] = lambda: monarch_matmul_reference(x, layer.w1, layer.w2)
    rows = []
    with torch.no_grad():
        for name, fn in variants.items():
            rows.append((name, profile_or_failure(f"monarch {name}", fn, args)))
    chosen = ", ".join(f"{key[0]}: {kernel}" for key, kernel in monarch_op.chosen_kernels.items()) or "none timed"
    return [
        f"## monarch: n={n}, nblocks={nblocks}, {tokens} tokens, {str(dtype).removeprefix('torch.')}, forward, no grad",
        "",
        f"op's kernel choice: {chosen}",
        "",
        *table(rows),
    ]


def reversible_section(args: argparse.Namespace) -> list[str]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import reversible as bench

    device = torch.device(args.device)
    lines = []
    for model_name in args.models.split(","):
        torch.manual_seed(0)
        if model_name == "revnet":
            batch, channels, size = (2, 4, 8) if args.small else (32, 64, 32)
            model = bench.revnet(args.depth, channels, args.dropout).to(device)
            x = torch.randn(batch, 3, size, size, device=device)
            shape = f"batch {batch}, {channels}+{channels} channels, {size}x{size}"
        elif model_name == "reformer":
            batch, tokens, width, heads = (2, 16, 16, 2) if args.small else (8, 512, 256, 8)
            model = bench.reformer(args.depth, width, heads, args.dropout).to(device)
            x = torch.randn(batch, tokens, 16, device=device)
            shape = f"batch {batch}, {tokens} tokens, width {width}+{width}, {heads} heads"
        else:
            raise SystemExit(f"--models: unknown {model_name!r}; valid: revnet, reformer")
        rows = []
        for variant in ("eager", "memopt-reversible", "memopt-reversible-op"):
            fn = bench.build(variant, model, lowering=args.lowering, budget_lowering=args.lowering)

            def step(fn=fn):
                out = fn(x)
                out.float().square().mean().backward()

            rows.append((variant, profile_or_failure(f"reversible {model_name} {variant}", step, args)))
        lines += [
            f"## reversible: {model_name}, depth {args.depth}, {shape}, float32, dropout {args.dropout}, "
            "one training step, "
            f"memopt lowering `{args.lowering}`",
            "",
        ]
        lines += table(rows) + [""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--parts", default="monarch,reversible", help="comma-separated: monarch, reversible")
    parser.add_argument("--models", default="revnet,reformer", help="reversible models")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--lowering", default="inductor", choices=("inductor", "eager"), help="memopt's lowering")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout in every reversible branch")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="tiny shapes: check the script itself")
    parser.add_argument("--output", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = set(parts) - {"monarch", "reversible"}
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(sorted(unknown))}; valid: monarch, reversible")
    if args.device == "cuda":
        where = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        where = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [
        f"# Host and GPU time per call ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"device: {where}; torch {torch.__version__}; memopt {memopt.__version__}; python {platform.python_version()}",
        f"{args.calls} calls per variant after {args.warmup} warm-up calls",
        "",
    ]
    if "monarch" in parts:
        lines += monarch_section(args) + [""]
    if "reversible" in parts:
        lines += reversible_section(args)
    report = "\n".join(lines)
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
