"""Compile the im2win Triton kernel ahead of time for a GPU that is not here, and read its code.

    python benchmarks/im2win_aot.py                          # sm_90, bf16, the 3x3/5x5 layers, both layouts and forms
    python benchmarks/im2win_aot.py --dtype fp32 --layers 10 --config 128 128 32 8 3
    python benchmarks/im2win_aot.py --dump /tmp/im2win-sass  # also write each kernel's TTGIR, PTX and SASS

Builds the launcher's arguments on meta tensors (``im2win_conv._launch_arguments``),
specializes them as Triton's JIT would on a GPU (integers equal to 1 become constants,
pointers and multiples of 16 carry divisibility 16), compiles with ``triton.compile`` for
``GPUTarget("cuda", capability, 32)`` and prints a markdown table of what the code does:
registers and local memory (``cuobjdump -res-usage``; local > 0 means spills), warpgroup
MMAs (``wgmma`` / SASS ``HGMMA``), 16-byte ``cp.async`` (SASS ``LDGSTS.128``) against
narrower ones and plain global loads, and integer divisions left in the PTX. Needs only
Triton's bundled CUDA tools, no GPU; the code is Triton's installed version's, which may
differ from the GPU machine's.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch

from memopt.triton_kernels import im2win_conv

LAYERS = [  # (C_in, H = W, C_out, K, stride), as in benchmarks/im2win.py
    (3, 227, 96, 11, 4), (3, 231, 96, 11, 4), (3, 227, 64, 7, 2), (32, 224, 64, 7, 2),
    (96, 24, 256, 5, 1), (256, 12, 512, 3, 1), (3, 224, 64, 3, 1), (64, 112, 128, 3, 1),
    (64, 56, 64, 3, 1), (128, 28, 128, 3, 1), (256, 14, 256, 3, 1), (512, 7, 512, 3, 1),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_layer(layer, dtype: torch.dtype, channels_last: bool, window: str, config, capability: int, batch: int):
    import triton
    from triton.backends.compiler import GPUTarget

    channels, size, out_channels, kernel, stride = layer
    x = torch.empty(batch, channels, size, size, dtype=dtype, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.empty(out_channels, channels, kernel, kernel, dtype=dtype, device="meta")
    padding = kernel // 2
    args, constants, _ = im2win_conv._launch_arguments(
        x, weight, None, (stride, stride), (padding, padding), (1, 1), 1, "none", window, False
    )
    fn = im2win_conv._kernel()
    constants.update(BLOCK_P=config[0], BLOCK_CO=config[1], BLOCK_K=config[2])
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name], constexprs[name] = "constexpr", constants[name]
            continue
        value = args[index]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        source, target=GPUTarget("cuda", capability, 32), options={"num_warps": config[3], "num_stages": config[4]}
    )


def inspect(compiled, dump: str | None, name: str) -> dict[str, object]:
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as file:
            file.write(compiled.asm["cubin"])
        usage = subprocess.run([f"{tools}/cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([f"{tools}/nvdisasm", "-c", cubin], capture_output=True, text=True).stdout
    if dump:
        os.makedirs(dump, exist_ok=True)
        for extension, text in (("ttgir", compiled.asm["ttgir"]), ("ptx", ptx), ("sass", sass)):
            with open(os.path.join(dump, f"{name}.{extension}"), "w") as file:
                file.write(text)

    def count(pattern: str, text: str) -> int:
        return len(re.findall(pattern, text))

    return {
        "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
        "local bytes": int(re.search(r"LOCAL:(\d+)", usage).group(1)),
        "shared KiB": compiled.metadata.shared // 1024,
        "wgmma": count(r"wgmma\.mma_async", ptx),
        "mma.sync": count(r"\bmma\.sync", ptx),
        "cp.async 16 B": count(r"cp\.async\.c[ag]\.shared\.global[^;]*, 0x10", ptx),
        "cp.async < 16 B": count(r"cp\.async\.c[ag]\.shared\.global[^;]*, 0x[248]\b", ptx),
        "ld.global": count(r"\bld\.global", ptx),
        "div/rem": count(r"\b(?:div|rem)\.[su]32", ptx),
        "SASS lines": count(r"\n\s+/\*[0-9a-f]{4,}\*/", sass),
    }


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 10], help="indices (0-11) into LAYERS")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--layouts", nargs="+", choices=("nchw", "channels_last"), default=["nchw", "channels_last"])
    parser.add_argument("--windows", nargs="+", choices=im2win_conv.WINDOWS, default=list(im2win_conv.WINDOWS))
    parser.add_argument("--config", type=int, nargs=5, default=[128, 128, 64, 8, 3],
                        metavar=("BLOCK_P", "BLOCK_CO", "BLOCK_K", "WARPS", "STAGES"))
    parser.add_argument("--capability", type=int, default=90)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dump", help="folder for each kernel's TTGIR, PTX and SASS")
    args = parser.parse_args(argv)
    import triton

    lines = [f"sm_{args.capability}, Triton {triton.__version__}, {args.dtype}, tile {tuple(args.config)}", ""]
    header = None
    for index in args.layers:
        for layout in args.layouts:
            for window in args.windows:
                layer = LAYERS[index]
                name = f"{'x'.join(map(str, layer))}-{args.dtype}-{layout}-{window}"
                compiled = compile_layer(
                    layer, DTYPES[args.dtype], layout == "channels_last", window, args.config,
                    args.capability, args.batch,
                )
                row = inspect(compiled, args.dump, name)
                if header is None:
                    header = ["layer (C_in, H, C_out, K, s)", "layout", "window", *row]
                    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                lines.append("| " + " | ".join([str(layer), layout, window, *map(str, row.values())]) + " |")
                print(lines[-1], flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
