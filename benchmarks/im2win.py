"""im2win vs aten's convolution (cuDNN on GPUs) vs im2col + matmul, on the im2win paper's 12 layers.

    python benchmarks/im2win.py                       # CUDA if present: batch 128, fp32 (TF32 off) and bf16
    python benchmarks/im2win.py --device cpu          # CPU: batch 2, fp32
    python benchmarks/im2win.py --save                # also write benchmarks/results/im2win-<date>-<device>.md

Prints markdown tables naming the device and versions: TFLOPS (median time, with the 20th
and 80th percentile times) and peak memory above the inputs (``memopt.measure``: CUDA peak
statistics or the CPU allocator's events; output included) for each method, and the
workspace of im2win's window tensor against im2col's column matrix.

Methods: ``aten`` (``torch.nn.functional.conv2d``: cuDNN on CUDA, oneDNN on CPU);
``im2col`` (``F.unfold`` + one matmul: cuBLAS on CUDA); ``im2win-implicit`` and
``im2win-materialized`` (the Triton kernel in its two forms, CUDA only, autotuned once per
layer before timing; the materialized window transform is inside the timed region); on CPU
``im2win`` is ``memopt::im2win_conv2d``'s PyTorch implementation.

Padding: ``--padding same`` (default) pads ``K // 2`` as real networks do (the 3x3 layers
keep their size); ``--padding none`` is the paper's setting (it supports no padding).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import memopt
from memopt.triton_kernels import im2win_conv

# (C_in, H = W, C_out, K, stride), from the paper.
LAYERS = [
    (3, 227, 96, 11, 4),
    (3, 231, 96, 11, 4),
    (3, 227, 64, 7, 2),
    (32, 224, 64, 7, 2),
    (96, 24, 256, 5, 1),
    (256, 12, 512, 3, 1),
    (3, 224, 64, 3, 1),
    (64, 112, 128, 3, 1),
    (64, 56, 64, 3, 1),
    (128, 28, 128, 3, 1),
    (256, 14, 256, 3, 1),
    (512, 7, 512, 3, 1),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def im2col_conv(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """Explicit im2col: the ``[N, C*K*K, L]`` column matrix, then one (batched) matmul."""
    batch = x.shape[0]
    out_channels, _, kernel, _ = weight.shape
    out_size = (x.shape[2] + 2 * padding - kernel) // stride + 1
    columns = F.unfold(x, kernel, padding=padding, stride=stride)
    out = weight.reshape(out_channels, -1) @ columns
    return out.view(batch, out_channels, out_size, out_size)


def time_ms(fn: Callable[[], object], device: str, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        samples = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return samples
    samples = []
    for _ in range(repeat):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1e3)
    return samples


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def methods(x, weight, stride: int, padding: int, device: str, allow_tf32: bool) -> dict[str, Callable[[], object]]:
    conv = dict(stride=[stride, stride], padding=[padding, padding], dilation=[1, 1], groups=1)
    found = {
        "aten": lambda: F.conv2d(x, weight, None, stride, padding),
        "im2col": lambda: im2col_conv(x, weight, stride, padding),
    }
    if device == "cuda":
        for window in im2win_conv.WINDOWS:
            found[f"im2win-{window}"] = lambda window=window: im2win_conv.im2win_conv2d_triton(
                x, weight, None, conv["stride"], conv["padding"], conv["dilation"], 1, "none", window,
                allow_tf32=allow_tf32,
            )
    else:
        found["im2win"] = lambda: torch.ops.memopt.im2win_conv2d(
            x, weight, None, conv["stride"], conv["padding"], conv["dilation"], 1, "none", "materialized"
        )
    return found


def run_layer(layer, batch: int, dtype: torch.dtype, device: str, padding_mode: str, warmup: int, repeat: int):
    channels, size, out_channels, kernel, stride = layer
    padding = kernel // 2 if padding_mode == "same" else 0
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype, generator=generator)
    weight = torch.randn(out_channels, channels, kernel, kernel, device=device, dtype=dtype, generator=generator)
    geo = im2win_conv.geometry(x.shape, weight.shape, (stride, stride), (padding, padding), (1, 1), 1)
    allow_tf32 = False  # fp32 is measured without TF32, as in the paper; bf16 ignores it
    found = methods(x, weight, stride, padding, device, allow_tf32)
    rows = {}
    reference = found["aten"]().float()
    with torch.no_grad():
        for name, fn in found.items():
            out = fn()  # first call: Triton autotuning / cuDNN algorithm search, untimed
            error = (out.float() - reference).abs().max().item() / reference.abs().max().item()
            del out
            samples = time_ms(fn, device, warmup, repeat)
            peak = memopt.measure(fn, device=device).peak_bytes
            median = statistics.median(samples)
            rows[name] = {
                "ms": median,
                "ms_p20": quantile(samples, 0.2),
                "ms_p80": quantile(samples, 0.8),
                "tflops": geo.flops() / (median * 1e-3) / 1e12,
                "peak_bytes": peak,
                "rel_error": error,
            }
    element = x.element_size()
    workspace = {"window_bytes": geo.window_numel() * element, "im2col_bytes": geo.im2col_numel() * element}
    return rows, workspace


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def device_description(device: str) -> str:
    if device == "cuda":
        import triton

        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, Triton {triton.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="default: 128 on CUDA, 2 on CPU")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), help="default: fp32 bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--padding", choices=("same", "none"), default="same")
    parser.add_argument("--layers", type=int, nargs="+", help="indices (0-11) of the layers to run; default all")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, help="timed calls per method; default 20 on CUDA, 5 on CPU")
    parser.add_argument("--save", action="store_true", help="write the tables to benchmarks/results/")
    parser.add_argument(
        "--precompile", type=int, default=0, metavar="WORKERS",
        help="CUDA: first compile every layer's autotuning candidates in this many processes",
    )
    parser.add_argument("--precompile-only", action="store_true", help="stop after --precompile")
    args = parser.parse_args(argv)
    device = args.device
    batch = args.batch or (128 if device == "cuda" else 2)
    dtype_names = args.dtypes or (["fp32", "bf16"] if device == "cuda" else ["fp32"])
    repeat = args.repeat or (20 if device == "cuda" else 5)
    layers = [LAYERS[index] for index in args.layers] if args.layers else LAYERS
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
        if args.precompile:
            precompile(layers, batch, dtype_names, args.padding, args.precompile)
    if args.precompile_only:
        return ""

    lines = [
        f"# im2win benchmark ({datetime.date.today().isoformat()})",
        "",
        f"Device: {device_description(device)}; PyTorch {torch.__version__}; Python {sys.version.split()[0]}",
        f"Batch {batch}; padding {args.padding}; median of {repeat} timed calls after {args.warmup} warm-up "
        "(plus one untimed first call); peak memory above the inputs, output included (`memopt.measure`).",
        "",
    ]
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        table = None
        summary = []
        for layer in layers:
            rows, workspace = run_layer(layer, batch, dtype, device, args.padding, args.warmup, repeat)
            names = list(rows)
            if table is None:
                table = [
                    f"## {dtype_name}" + (" (TF32 off)" if dtype == torch.float32 and device == "cuda" else ""),
                    "",
                    "| layer (C_in, H, C_out, K, s) | "
                    + " | ".join(f"{name} TFLOPS (ms p20-p80)" for name in names)
                    + " | "
                    + " | ".join(f"{name} peak MiB" for name in names)
                    + " | window / im2col MiB | max rel. error |",
                    "|" + "---|" * (2 * len(names) + 3),
                ]
            cells = [
                f"{rows[name]['tflops']:.3f} ({rows[name]['ms_p20']:.2f}-{rows[name]['ms_p80']:.2f})" for name in names
            ]
            cells += [mib(rows[name]["peak_bytes"]) for name in names]
            ratio = workspace["window_bytes"] / workspace["im2col_bytes"]
            cells.append(f"{mib(workspace['window_bytes'])} / {mib(workspace['im2col_bytes'])} ({ratio:.2f}x)")
            cells.append(f"{max(row['rel_error'] for row in rows.values()):.1e}")
            table.append(f"| {layer} | " + " | ".join(cells) + " |")
            summary.append((layer, rows, ratio))
            print(table[-1], file=sys.stderr, flush=True)
        lines += table + [""] + summarize(summary, dtype, device) + [""]
    text = "\n".join(lines)
    print(text)
    if args.save:
        name = f"im2win-{datetime.date.today().isoformat()}-{device}.md"
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as file:
            file.write(text + "\n")
        print(f"written to {path}", file=sys.stderr)
    return text


def _compile_layer(task) -> str:
    """Worker: run one layer's autotuned kernel once, filling Triton's on-disk kernel cache."""
    layer, batch, dtype_name, padding_mode, window = task
    channels, size, out_channels, kernel, stride = layer
    padding = kernel // 2 if padding_mode == "same" else 0
    x = torch.randn(batch, channels, size, size, device="cuda", dtype=DTYPES[dtype_name])
    weight = torch.randn(out_channels, channels, kernel, kernel, device="cuda", dtype=x.dtype)
    im2win_conv.im2win_conv2d_triton(
        x, weight, None, [stride, stride], [padding, padding], [1, 1], 1, "none", window, allow_tf32=False
    )
    torch.cuda.synchronize()
    return f"{layer} {dtype_name} {window}"


def precompile(layers, batch: int, dtype_names: list[str], padding_mode: str, workers: int) -> None:
    """Compile every (layer, dtype, window)'s autotuning candidates in parallel processes.

    Each layer's geometry is a set of constexprs, so the autotuner compiles its candidates
    for every layer anew, one after another: on a fresh machine compilation, not the GPU,
    would take most of the run. Workers fill Triton's on-disk cache (same shapes, so the
    same specializations); the timing process then only loads binaries and autotunes. The
    workers' own autotuning runs with the GPU shared, so its choices are thrown away.
    """
    import concurrent.futures
    import multiprocessing

    tasks = [
        (layer, batch, dtype_name, padding_mode, window)
        for layer in layers for dtype_name in dtype_names for window in im2win_conv.WINDOWS
    ]
    begin = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        for done in pool.map(_compile_layer, tasks):
            print(f"precompiled {done}", file=sys.stderr, flush=True)
    print(f"precompiled {len(tasks)} kernels in {time.perf_counter() - begin:.0f} s", file=sys.stderr, flush=True)


def summarize(summary, dtype: torch.dtype, device: str) -> list[str]:
    """The issue's targets, judged on the numbers just measured."""
    lines = []
    three_by_three = [ratio for layer, _, ratio in summary if layer[3] == 3 and layer[4] == 1]
    if three_by_three:
        lines.append(
            f"- Workspace, 3x3 stride 1: window / im2col at most {max(three_by_three):.3f}x (target <= 0.4x)."
        )
    im2win_names = [name for name in summary[0][1] if name.startswith("im2win")]
    best = [min(rows[name]["ms"] for name in im2win_names) for _, rows, _ in summary]
    aten = [rows["aten"]["ms"] for _, rows, _ in summary]
    im2col = [rows["im2col"]["ms"] for _, rows, _ in summary]
    speedups = [a / b for a, b in zip(aten, best)]
    lines.append(
        f"- Best im2win vs aten: median speed-up {statistics.median(speedups):.2f}x, ahead on "
        f"{sum(s > 1 for s in speedups)} of {len(speedups)} layers."
    )
    lines.append(
        f"- Best im2win vs im2col + matmul: ahead on {sum(c > b for c, b in zip(im2col, best))} of {len(best)} layers."
    )
    if device != "cuda":
        lines.append("- CPU run: im2win here is the PyTorch implementation, not the Triton kernel; GPU targets are not measured.")
    return lines


if __name__ == "__main__":
    main()
