"""Training memory of a diffusers video UNet converted to reversible chains.

``reversible="convert"`` (opt-in: it changes the architecture, for training from scratch)
rewrites each block's residual sublayers (ResNets, temporal convolutions, spatial and
temporal transformers, and the transformers' own attention and MLP sublayers) into the
two-stream reversible form, and the ``reversible`` pass then keeps only each chain's two
final outputs for the backward. This times one training step of a UNet3DConditionModel
(random weights, the config of ``benchmarks/slicing.py``) against what a user has today:

* ``inductor``: ``torch.compile`` with its defaults (the others are compared with it);
* ``eager``: the module as written;
* ``checkpoint-per-block``: ``torch.utils.checkpoint`` around each down, mid and up block
  and ``transformer_in`` (recomputed in the backward: the hand-made alternative, which
  diffusers' ``enable_gradient_checkpointing()`` would be if UNet3DConditionModel supported it);
* ``budget-0.1``: memopt with ``reversible=False, memory_budget=0.1`` (Inductor's min-cut
  partitioner told to keep 10% of the activations: the stock compiler's best effort, no
  architecture change);
* ``memopt-convert``: ``memopt.compile(unet, reversible="convert")`` (Inductor lowering);
* ``memopt-convert-flat``: the same with ``reversible_nested=False`` (a transformer's
  attention/MLP chain inside a block's step stays code that the step recomputes whole);
* ``memopt-convert-budget``: ``memopt-convert`` with ``memory_budget=0.1``: the min-cut partitioner
  also recomputes what the chains leave (the layers between them) where it can.

The converted model is a different function, so its output is not compared with the others;
its gradients are tested against the converted graph without the rewrite in
``tests/test_reversible.py``. Peak and time come from ``measure_step`` of
``benchmarks/reversible.py`` (gradients allocated before the measured steps; compiled
variants' "activation" leaves out their one gradient-sized transient).

    python benchmarks/reversible_unet.py                       # CPU-sized defaults
    python benchmarks/reversible_unet.py --channels 64,128,128 --frames 16 --size 32   # GPU
    python benchmarks/reversible_unet.py --dropout 0.1    # training with dropout everywhere
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import platform
import sys

import torch

import memopt
from reversible import measure_step, write_table
from slicing import build, inputs
from torch.utils.checkpoint import checkpoint

VARIANTS = (
    "inductor", "eager", "checkpoint-per-block", "budget-0.1", "memopt-convert", "memopt-convert-flat",
    "memopt-convert-budget",
)
COMPILED = ("inductor", "budget-0.1", "memopt-convert", "memopt-convert-flat", "memopt-convert-budget")


@contextlib.contextmanager
def checkpointed_blocks(unet: torch.nn.Module):
    """Run each down, mid and up block (and ``transformer_in``) under non-reentrant
    ``torch.utils.checkpoint`` while the block is active."""
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks, unet.transformer_in]
    for block in blocks:
        block.forward = functools.partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", default="32,64", help="block_out_channels")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--dropout", type=float, default=0.0,
        help="set every nn.Dropout of the UNet to this p (training with dropout: random steps in the chains)",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--output", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(map(repr, unknown))}; valid: {', '.join(VARIANTS)}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    channels = tuple(int(c) for c in args.channels.split(","))
    torch.manual_seed(0)
    unet = build("unet3d", channels, args.frames).train().to(device)
    dropouts = [module for module in unet.modules() if isinstance(module, torch.nn.Dropout)]
    for module in dropouts:
        module.p = args.dropout
    (sample, timestep, context), _ = inputs("unet3d", args.frames, args.size, channels[0], device, torch.float32)
    param_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    lines = [
        f"# reversible convert: one training step of a diffusers UNet3DConditionModel ({datetime.date.today()})",
        "",
        f"device: {device.type} ({device_name}), torch {torch.__version__}, float32; block_out_channels {channels}, "
        f"{args.frames} frames, {args.size}x{args.size} latents, parameters {param_bytes / 2**20:.1f} MiB, "
        f"dropout {args.dropout:g} ({len(dropouts)} nn.Dropout modules); step time = "
        f"median of {args.repeat} runs " + ("(CUDA wall time)" if cuda else "(CPU process time, 1 thread)"),
        "",
        "| variant | peak (MiB) | activation (MiB) | vs inductor | step time (ms) | time / inductor | first call (s) "
        "| chains |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    measured: dict[str, tuple[float, float]] = {}
    for variant in variants:
        torch.compiler.reset()
        module = {
            "inductor": lambda: torch.compile(unet),
            "budget-0.1": lambda: memopt.compile(unet, reversible=False, memory_budget=0.1),
            "memopt-convert": lambda: memopt.compile(unet, reversible="convert"),
            "memopt-convert-flat": lambda: memopt.compile(unet, reversible="convert", reversible_nested=False),
            "memopt-convert-budget": lambda: memopt.compile(unet, reversible="convert", memory_budget=0.1),
        }.get(variant, lambda: unet)()

        def step_fn(x, module=module):
            return module(x, timestep, context, return_dict=False)[0]

        checkpointing = checkpointed_blocks(unet) if variant == "checkpoint-per-block" else contextlib.nullcontext()
        with checkpointing, memopt.report.collect_reports() as reports:
            peak, seconds, first_call = measure_step(step_fn, unet, sample, args.repeat)
        activation = peak - (param_bytes if variant in COMPILED else 0)
        measured[variant] = activation, seconds
        chains = sum(
            result.rewrites for report in reports for result in report.passes if result.name == "reversible"
        )
        base = measured.get("inductor")
        row = (
            f"| {variant} | {peak / 2**20:.1f} | {activation / 2**20:.1f} | "
            + (f"{base[0] / activation:.2f}x lower | " if base else " | ")
            + f"{seconds * 1e3:.0f} | "
            + (f"{seconds / base[1]:.2f}x | " if base else " | ")
            + f"{first_call:.1f} | {chains if variant.startswith('memopt') else ''} |"
        )
        lines.append(row)
        print(row, flush=True)
    write_table(lines, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
