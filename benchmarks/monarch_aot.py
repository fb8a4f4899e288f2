"""Compile the Monarch grouped-GEMM kernel ahead of time for a GPU that is not here, and read
what Triton and ptxas made of it: no GPU needed, only Triton and its bundled ptxas.

    python benchmarks/monarch_aot.py                          # sm_90, n=4096, nblocks=4, 8192 tokens
    python benchmarks/monarch_aot.py --n 8192 --arch 90 --dump /tmp/monarch_aot

For each of the six GEMMs of the forward and backward (named as in
:mod:`memopt.triton_kernels.monarch`) and each autotune config, it specializes the arguments
the way Triton's launcher does (ints equal to 1 become constants, ints and pointers divisible
by 16 get ``tt.divisibility = 16``), compiles, and prints a markdown table of: global load
widths in the PTX (``ld.global`` by vector width, ``cp.async`` by byte count, TMA), whether
the dot became Hopper ``wgmma``, the pipelining depth Triton gave the loop, and registers and
spill bytes from ``ptxas -v``. ``--dump`` writes the TTGIR/PTX/SASS of each compile there.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import subprocess
import sys
import tempfile

import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget

from memopt.triton_kernels import monarch

_NO_SPLIT = monarch._NO_SPLIT


def six_gemms(tokens: int, nblocks: int, p: int, q: int, s: int) -> dict[str, tuple]:
    """``name -> (groups, M, N, K, a_strides, b_strides, c_strides)`` exactly as the launchers
    in :mod:`memopt.triton_kernels.monarch` pass them (contiguous x and grad)."""
    r = q // nblocks
    return {
        "fwd1 h=x.w1": (nblocks, tokens, q, p,
                        (p, nblocks * p, _NO_SPLIT, 0, 1), (q * p, 1, _NO_SPLIT, 0, p), (q, nblocks * q, _NO_SPLIT, 0, 1)),
        "fwd2 y=hP.w2": (nblocks, tokens, s, q,
                         (r, nblocks * q, r, q, 1), (s * q, 1, _NO_SPLIT, 0, q), (s, nblocks * s, _NO_SPLIT, 0, 1)),
        "bwd dw2": (nblocks, s, q, tokens,
                    (s, 1, _NO_SPLIT, 0, nblocks * s), (r, nblocks * q, r, q, 1), (s * q, q, _NO_SPLIT, 0, 1)),
        "bwd dh": (nblocks, tokens, q, s,
                   (s, nblocks * s, _NO_SPLIT, 0, 1), (s * q, q, _NO_SPLIT, 0, 1), (r, nblocks * q, r, q, 1)),
        "bwd dw1": (nblocks, q, p, tokens,
                    (q, 1, _NO_SPLIT, 0, nblocks * q), (p, nblocks * p, _NO_SPLIT, 0, 1), (q * p, p, _NO_SPLIT, 0, 1)),
        "bwd dx": (nblocks, tokens, p, q,
                   (q, nblocks * q, _NO_SPLIT, 0, 1), (q * p, p, _NO_SPLIT, 0, 1), (p, nblocks * p, _NO_SPLIT, 0, 1)),
    }  # fmt: skip


def compile_one(jit_fn, heuristics, args: dict, meta: dict, num_warps: int, num_stages: int, arch: int):
    """Compile ``jit_fn`` for ``args`` (names -> values; pointers given as dtype strings like
    ``"*bf16"``) with the launcher's specialization; returns the CompiledKernel."""
    args = dict(args)
    args.update(meta)
    for name, rule in heuristics.items():
        args[name] = rule(args)
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(jit_fn.arg_names):
        value = args[name]
        if jit_fn.params[index].is_constexpr:
            signature[name] = "constexpr"
            constexprs[(index,)] = value
        elif isinstance(value, str):  # a pointer; torch's allocator gives 16-byte (>= 256) alignment
            signature[name] = value
            attrs[(index,)] = BaseBackend.parse_attr("D")
        else:
            kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
            signature[name] = kind
            if kind == "constexpr":
                constexprs[(index,)] = spec
            else:
                attrs[(index,)] = BaseBackend.parse_attr(spec)
    src = triton.compiler.ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """``(registers, spill bytes)`` from ``ptxas -v`` on ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "k.ptx"
        path.write_text(ptx)
        log = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", str(path), "-o", str(path) + ".o"],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def load_summary(ptx: str) -> str:
    """Global loads by kind and width, e.g. ``cp.async16 x8, ld.v4 x2``."""
    counts = collections.Counter()
    for line in ptx.splitlines():
        line = line.strip()
        if line.startswith("//"):
            continue
        if match := re.search(r"cp\.async\.(?:ca|cg)\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-f]+|\d+)", line):
            counts[f"cp.async{int(match.group(1), 0)}"] += 1
        elif "cp.async.bulk.tensor" in line:
            counts["tma"] += 1
        elif match := re.search(r"ld\.global(?:\.\w+)*?(\.v\d)?\.(?:b|u|s|f)(\d+)", line):
            counts[f"ld{match.group(1) or ''}.b{match.group(2)}"] += 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="square layer size")
    parser.add_argument("--nblocks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--gemms", nargs="*", default=None, help="subset of the six GEMM names (prefix match)")
    parser.add_argument("--configs", type=int, nargs="*", default=None, help="indices into the autotune configs")
    parser.add_argument("--dump", type=pathlib.Path, default=None, help="folder for TTGIR/PTX/SASS")
    opts = parser.parse_args(argv)

    heuristics_obj, autotuned = monarch._kernels()
    jit_fn = heuristics_obj.fn
    heuristics = heuristics_obj.values
    p = opts.n // opts.nblocks
    gemms = six_gemms(opts.tokens, opts.nblocks, p, p, p)
    if opts.gemms:
        gemms = {k: v for k, v in gemms.items() if any(k.startswith(g) for g in opts.gemms)}
    configs = list(enumerate(autotuned.configs))
    if opts.configs is not None:
        configs = [configs[i] for i in opts.configs]
    print(f"triton {triton.__version__}, sm_{opts.arch}, {opts.dtype}, n={opts.n}, nblocks={opts.nblocks}, tokens={opts.tokens}\n")
    print("| gemm | config | global loads (PTX) | wgmma | mma.sync | stages | regs | spill B |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (groups, M, N, K, a_s, b_s, c_s) in gemms.items():
        values = dict(zip(jit_fn.arg_names, ["*" + opts.dtype] * 3 + [M, N, K, *a_s, *b_s, *c_s]))
        values["INPUT_PRECISION"] = "tf32"
        for index, config in configs:
            kernel = compile_one(jit_fn, heuristics, values, config.kwargs, config.num_warps, config.num_stages, opts.arch)
            ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
            wgmma = len(re.findall(r"wgmma\.mma_async", ptx))
            mma = len(re.findall(r"\bmma\.sync", ptx))
            stages = re.search(r'"ttg\.num-stages"\s*=\s*(\d+)|tt\.num_stages = (\d+)', ttgir)
            buffers = re.findall(r"ttg\.local_alloc[^\n]*!ttg\.memdesc<(\d+)x", ttgir)
            depth = ",".join(buffers) if buffers else "-"
            registers, spills = ptxas_usage(ptx, opts.arch)
            blocks = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            label = f"{index}: {blocks} w{config.num_warps} s{config.num_stages}"
            print(f"| {name} | {label} | {load_summary(ptx)} | {wgmma} | {mma} | {depth} | {registers} | {spills} |")
            if opts.dump:
                opts.dump.mkdir(parents=True, exist_ok=True)
                stem = re.sub(r"\W+", "_", f"{name}_{index}")
                (opts.dump / f"{stem}.ttgir").write_text(ttgir)
                (opts.dump / f"{stem}.ptx").write_text(ptx)
                if "sass" in kernel.asm:
                    (opts.dump / f"{stem}.sass").write_text(kernel.asm["sass"])
            sys.stdout.flush()


if __name__ == "__main__":
    main()
