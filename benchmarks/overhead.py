"""What memopt costs when no pass matches: time, peak memory and compile time vs Inductor.

Target (issue 2): within 5% of Inductor's run time and peak memory, and at most 1.2x its
compile time. Each model is compiled fresh by both backends (Inductor's caches disabled so
compile times are real), then inference and a training step are measured with
``memopt.measure``, alternating backends so that machine noise hits both alike.

    python benchmarks/overhead.py [--repeat 20] [--out benchmarks/results/overhead-DATE.md]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # honest compile times

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memopt  # noqa: E402
from common import device_line, markdown_table  # noqa: E402
from memopt.demo import DemoNet  # noqa: E402


def mlp():
    return nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 512)), (
        torch.randn(256, 512),
    )


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=1024, n_positions=128, n_embd=128, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config), (torch.randint(0, 1024, (4, 128)),)


def demo():
    return DemoNet(depth=2), (torch.randn(8, 3, 64, 64),)


MODELS = {"mlp": mlp, "gpt2-tiny": gpt2, "demo-net": demo}


def loss_of(output):
    if hasattr(output, "logits"):
        output = output.logits
    return output.float().pow(2).mean()


def warm_up_compilers():
    """Pay the once-per-process costs (imports, C++ toolchain checks) before timing."""
    for backend in ("inductor", "memopt"):
        torch._dynamo.reset()
        torch.compile(lambda x: torch.relu(x) + 1, backend=backend)(torch.randn(8))


def bench_model(name, factory, repeat):
    torch.manual_seed(0)
    base, inputs = factory()
    rows = []
    for mode in ("inference", "train"):
        compiled = {}
        compile_s = {}
        # Alternate which backend compiles first, in case order matters.
        order = ("inductor", "memopt") if mode == "inference" else ("memopt", "inductor")
        for backend in order:
            torch._dynamo.reset()
            model = copy.deepcopy(base).train(mode == "train")
            fn = torch.compile(model, backend=backend)
            step = _step(fn, model, inputs, mode)
            start = time.perf_counter()
            step()
            compile_s[backend] = time.perf_counter() - start
            compiled[backend] = step
        # Alternate the two backends so that drift in machine load hits both alike.
        times = {backend: [] for backend in ("inductor", "memopt")}
        peaks = {}
        for backend in times:
            peaks[backend] = memopt.measure(compiled[backend]).peak_bytes
        for _ in range(repeat):
            for backend, step in compiled.items():
                times[backend].append(memopt.measure(step, repeat=2).time_s)
        ms = {backend: statistics.median(values) * 1e3 for backend, values in times.items()}
        rows.append(
            [
                name,
                mode,
                round(ms["inductor"], 2),
                round(ms["memopt"], 2),
                round(ms["memopt"] / ms["inductor"], 3),
                round(peaks["inductor"] / 2**20, 2),
                round(peaks["memopt"] / 2**20, 2),
                round(peaks["memopt"] / max(peaks["inductor"], 1), 3),
                round(compile_s["inductor"], 1),
                round(compile_s["memopt"], 1),
                round(compile_s["memopt"] / compile_s["inductor"], 2),
            ]
        )
        print(markdown_table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
    return rows


def _step(fn, model, inputs, mode):
    if mode == "inference":
        def inference():
            with torch.no_grad():
                return fn(*inputs)

        return inference

    def train():
        model.zero_grad(set_to_none=True)
        loss_of(fn(*inputs)).backward()

    return train


HEADERS = [
    "model", "mode", "inductor ms", "memopt ms", "time ratio", "inductor peak MiB", "memopt peak MiB",
    "memory ratio", "inductor compile s", "memopt compile s", "compile ratio",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    header = f"memopt overhead vs Inductor (no pass matching), {datetime.date.today()}\n\n{device_line()}\n"
    print(header)
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
    warm_up_compilers()
    rows = []
    for name in args.models:
        rows.extend(bench_model(name, MODELS[name], args.repeat))
    table = markdown_table(HEADERS, rows)
    print()
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(f"# {header}\n{table}\n")


if __name__ == "__main__":
    main()
