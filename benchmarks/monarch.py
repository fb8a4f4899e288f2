"""Monarch layers against dense ones: time, peak memory and parameter bytes.

    python benchmarks/monarch.py                      # CPU: float32, n in {1024, 4096}
    python benchmarks/monarch.py --sizes 1024 4096 8192 --save   # GPU: bfloat16, all sizes

Per size n (square n x n layers), nblocks and ``--tokens`` tokens, the forward pass of:
  dense      ``nn.Linear`` (MKL/oneDNN on CPU, cuBLAS on GPU)
  monarch    ``memopt.nn.MonarchLinear`` (the ``memopt::monarch_matmul`` op: on CPU the
             two-batched-matmul reference; on CUDA whichever of the next two rows its first
             call measured faster, named in the row as ``monarch (auto: <kernel>)``)
  triton     (CUDA only) the Triton kernels alone on the same factors
  reference  (CUDA only) the pure-PyTorch reference (two ``bmm`` and a transpose) alone
Targets (issue 5): CPU float32 n=4096, nblocks=4: monarch >= 1.5x faster than dense. GPU
bfloat16 nblocks=4: monarch >= 1.7x faster than dense, Triton >= 1.2x faster than the
reference. Parameter bytes 2/nblocks of dense. Times: median (p20-p80) over ``--repeat``
rounds in which every variant runs once in turn (fair on a shared, noisy machine); peak
memory (``memopt.measure``) is what one call allocates above the start.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import statistics
import sys
import time

import torch

import memopt
from memopt.nn import MonarchLinear
from memopt.ops import monarch as monarch_op
from memopt.triton_kernels.monarch import monarch_matmul_reference, monarch_matmul_triton


def device_line(device: str) -> str:
    if device == "cuda":
        name = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return f"device: {name}; torch {torch.__version__}; triton {triton_version}; python {platform.python_version()}"


def quantiles(times: list[float]) -> tuple[float, float, float]:
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return statistics.median(ordered), pick(0.2), pick(0.8)


def time_interleaved(
    fns: dict[tuple, object], device: str, warmup: int, repeat: int, inner: int
) -> dict[tuple, list[float]]:
    """Seconds per call of each ``fns`` entry, over ``repeat`` rounds that call every entry in
    turn (``inner`` calls per timing): on a shared machine, load changes hit all variants
    alike instead of skewing whichever happened to run during a busy spell."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in range(repeat):
            for name, fn in fns.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                begin = time.perf_counter()
                for _ in range(inner):
                    fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - begin) / inner)
    return times


def peak_bytes(fn, device: str) -> int:
    """Bytes ``fn()`` allocates above the starting level (``memopt.measure``: CUDA peak stats,
    or the CPU allocator events of one profiled call)."""
    with torch.no_grad():
        return memopt.measure(fn, device=device, warmup=0, repeat=1).peak_bytes


def run(args: argparse.Namespace) -> str:
    device = args.device
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    inner = 10 if device == "cuda" else 1
    rows = []
    for n in args.sizes:
        torch.manual_seed(0)
        x = torch.randn(args.tokens, n, device=device, dtype=dtype)
        dense = torch.nn.Linear(n, n, bias=False, device=device, dtype=dtype)
        fns = {("dense", "-"): lambda: dense(x)}
        weights = {("dense", "-"): dense.weight.numel() * dense.weight.element_size()}
        layers = {}
        for nblocks in args.nblocks:
            layer = layers[nblocks] = MonarchLinear(n, n, nblocks, bias=False, device=device, dtype=dtype)
            fns[("monarch", nblocks)] = lambda layer=layer: layer(x)
            weights[("monarch", nblocks)] = sum(p.numel() * p.element_size() for p in layer.parameters())
            if device == "cuda":
                fns[("triton", nblocks)] = lambda layer=layer: monarch_matmul_triton(x, layer.w1, layer.w2)
                fns[("reference", nblocks)] = lambda layer=layer: monarch_matmul_reference(x, layer.w1, layer.w2)
                weights[("triton", nblocks)] = weights[("reference", nblocks)] = weights[("monarch", nblocks)]
        # Every timed variant is checked against a float32 product with its dense matrix.
        exact = {("dense", "-"): dense.weight.float()}
        exact.update({key: layers[key[1]].to_dense().float() for key in fns if key[0] != "dense"})
        with torch.no_grad():
            errors = {key: relative_error(fn(), x.float() @ exact[key].T) for key, fn in fns.items()}
        times = time_interleaved(fns, device, args.warmup, args.repeat, inner)
        dense_time = statistics.median(times[("dense", "-")])
        for key, fn in fns.items():
            name, nblocks = key
            if name == "monarch" and device == "cuda":
                name = f"monarch (auto: {chosen_kernel(layers[nblocks])})"
            median, p20, p80 = quantiles(times[key])
            peak = peak_bytes(fn, device)
            rows.append([n, nblocks, name, median * 1e3, f"{p20 * 1e3:.3g}-{p80 * 1e3:.3g}", dense_time / median,
                         peak / 2**20, weights[key] / 2**20, weights[key] / weights[("dense", "-")],
                         f"{errors[key]:.1e}"])  # fmt: skip
            speedup = dense_time / median
            print(f"n={n} nblocks={nblocks} {name}: {median * 1e3:.1f} ms ({speedup:.2f}x)", file=sys.stderr)
        del x, dense, layers, fns
    headers = ["n", "nblocks", "layer", "median ms", "p20-p80 ms", "speedup vs dense", "peak MiB",
               "weight MiB", "weight / dense", "rel. error vs float32"]  # fmt: skip
    lines = [
        f"# Monarch vs dense linear layers ({args.dtype}, {args.tokens} tokens, forward, no grad)",
        "",
        device_line(device),
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"warmup {args.warmup}, {args.repeat} interleaved rounds of {inner} call(s)",
        "",
        _table(headers, rows),
    ]
    return "\n".join(lines)


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    """``||out - exact|| / ||exact||`` in float32."""
    return ((out.float() - exact).norm() / exact.norm()).item()


def chosen_kernel(layer: MonarchLinear) -> str:
    """The kernel ``memopt::monarch_matmul`` chose for ``layer``'s forward (its first call timed both)."""
    choices = {
        kernel
        for key, kernel in monarch_op.chosen_kernels.items()
        if key[0] == "forward" and key[2:5] == tuple(layer.w1.shape)
    }
    return "/".join(sorted(choices)) or "not timed"


def _table(headers: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines.extend("| " + " | ".join(cell(value) for value in row) + " |" for row in rows)
    return "\n".join(lines)


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")  # fmt: skip
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="default: 1024 4096 8192 on CUDA, 1024 4096 on CPU")  # fmt: skip
    parser.add_argument("--nblocks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=None, help="default: 10 on CUDA, 1 on CPU")
    parser.add_argument("--repeat", type=int, default=None, help="default: 20 on CUDA, 5 on CPU")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/monarch-<date>-<device>.md")
    args = parser.parse_args()
    on_cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    args.sizes = args.sizes or ([1024, 4096, 8192] if on_cuda else [1024, 4096])
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 1)
    args.repeat = args.repeat if args.repeat is not None else (20 if on_cuda else 5)
    text = run(args)
    print(text)
    if args.save:
        results = pathlib.Path(__file__).parent / "results"
        results.mkdir(exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        path = results / f"monarch-{stamp}-{args.device}.md"
        path.write_text(text + "\n")
        print(f"saved {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
