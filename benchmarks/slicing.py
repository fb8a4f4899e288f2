"""Benchmark of the slicing pass and Step Rehash on diffusers' video UNets.

One denoising step of each video UNet (random weights from small configs, nothing
downloaded): peak memory (``memopt.measure``: CPU allocator events, or CUDA peak
statistics) and time (fastest call) of eager PyTorch, Inductor, and memopt (slicing, lowered by
Inductor), with memopt's output compared against eager. Then a denoising loop (DDIM) with
and without Step Rehash: time and the relative L2 difference of the final latents.

    python benchmarks/slicing.py                        # CPU-sized defaults
    python benchmarks/slicing.py --frames 16 --size 64 --channels 320,640,1280,1280   # GPU

On CUDA, ``--cudagraphs`` adds Inductor and memopt replayed as CUDA graphs (their peak is read
over the calls that warm up and record); ``--variants`` picks which variants to compile, since
on a GPU compiling them is most of the benchmark's time.

Prints a markdown table naming the device and versions; ``--out DIR`` also writes it to
``DIR/slicing-<date>-<device>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

import memopt


def build(kind: str, channels: tuple[int, ...], frames: int):
    import diffusers

    levels = len(channels)
    heads = 8 if channels[0] >= 320 else 2
    if kind == "unet3d":
        return diffusers.UNet3DConditionModel(
            in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock3D",) * (levels - 1) + ("DownBlock3D",),
            up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (levels - 1),
            block_out_channels=channels, layers_per_block=1 if channels[0] < 320 else 2,
            norm_num_groups=min(32, channels[0] // 4), cross_attention_dim=channels[0],
            # UNet3D's ``attention_head_dim`` is really the blocks' head count, and also the
            # head width of ``transformer_in`` (8 heads, full resolution, before the first
            # block). The real model (ModelScope: 320 channels, 64) gives ``transformer_in``
            # an inner width of 1.6x the channels; ``channels // 4`` keeps it at 2x in small
            # configs (``channels // 2``, used before, made it 4x and that one layer a quarter
            # of a step).
            attention_head_dim=64 if channels[0] >= 320 else channels[0] // 4,
        )
    if kind == "animatediff":
        return diffusers.UNetMotionModel(
            in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlockMotion",) * (levels - 1) + ("DownBlockMotion",),
            up_block_types=("UpBlockMotion",) + ("CrossAttnUpBlockMotion",) * (levels - 1),
            block_out_channels=channels, layers_per_block=1 if channels[0] < 320 else 2,
            norm_num_groups=min(32, channels[0] // 4), cross_attention_dim=channels[0],
            num_attention_heads=heads, motion_num_attention_heads=heads,
            motion_max_seq_length=max(32, frames),
        )
    if kind == "svd":
        return diffusers.UNetSpatioTemporalConditionModel(
            in_channels=8, out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal",) * (levels - 1) + ("DownBlockSpatioTemporal",),
            up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * (levels - 1),
            block_out_channels=channels, layers_per_block=1 if channels[0] < 320 else 2,
            cross_attention_dim=channels[0], num_attention_heads=tuple(c // 32 if c >= 320 else 2 for c in channels),
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=24, num_frames=frames,
        )
    raise ValueError(kind)


def inputs(kind: str, frames: int, size: int, context_dim: int, device, dtype, batch: int = 1):
    """One step's inputs; ``batch=2`` is what a pipeline under classifier-free guidance passes
    (the unconditional and the conditional sample together)."""
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    timestep = torch.tensor(501, device=device)
    if kind == "unet3d":
        return (randn(batch, 4, frames, size, size), timestep, randn(batch, 77, context_dim)), {}
    if kind == "animatediff":
        return (randn(batch, 4, frames, size, size), timestep, randn(batch * frames, 77, context_dim)), {}
    return (randn(batch, frames, 8, size, size), timestep, randn(batch, 1, context_dim)), {
        "added_time_ids": randn(batch, 3)
    }


COMPILE_BODY = {"default": {}, "on": {"compile_body": True}, "off": {"compile_body": False}}


def step_row(kind, args, device, dtype):
    channels = tuple(int(c) for c in args.channels.split(","))
    torch.manual_seed(0)
    unet = build(kind, channels, args.frames).eval().to(device, dtype)
    call_args, call_kwargs = inputs(kind, args.frames, args.size, channels[0], device, dtype, args.batch)
    call_kwargs["return_dict"] = False
    rows = {}
    with torch.no_grad():
        reference = unet(*call_args, **call_kwargs)[0]
        variants = {
            "eager": unet,
            "inductor": torch.compile(unet, backend="inductor"),
            # 1 MiB groups: slicing at full strength (the "auto" default leaves groups saving
            # under 16 MiB alone, to protect small graphs' speed).
            "memopt": memopt.compile(unet, slicing={"min_group_bytes": 1 << 20, **COMPILE_BODY[args.compile_body]}),
        }
        if args.cudagraphs and device.type == "cuda":
            # The whole step replayed as CUDA graphs: Inductor's cudagraph trees, and memopt's
            # Inductor lowering with the same switch (the sliced groups' bodies are compiled on
            # the warm-up call, before capture, and replayed inside the graph).
            variants["inductor-cudagraphs"] = torch.compile(unet, mode="reduce-overhead")
            variants["memopt-cudagraphs"] = memopt.compile(
                unet,
                slicing={"min_group_bytes": 1 << 20, **COMPILE_BODY[args.compile_body]},
                inductor_config={"triton.cudagraphs": True},
            )
        chosen = args.variants.split(",") if args.variants else list(variants)
        unknown = sorted(set(chosen) - set(variants))
        if unknown or "inductor" not in chosen:
            raise SystemExit(
                f"--variants: {', '.join(unknown) or 'inductor missing'}; valid: {', '.join(variants)} "
                "(inductor is the baseline and must be among them)"
            )
        variants = {name: variants[name] for name in chosen}
        for name, model in variants.items():
            try:
                torch._dynamo.reset()
                graphs = name.endswith("-cudagraphs")
                if graphs:
                    # A replay allocates nothing (its memory was taken from the graph pool while
                    # recording), so the peak is read over the calls that warm up and record.
                    torch.cuda.synchronize()
                    start_level = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                begin = time.perf_counter()
                out = model(*call_args, **call_kwargs)[0]  # compiles
                compile_s = time.perf_counter() - begin
                # Read now: a later replay of a CUDA graph overwrites its outputs.
                error = ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
                report = memopt.last_report() if name.startswith("memopt") else None
                if graphs:
                    for _ in range(2):  # record, then the first replay
                        model(*call_args, **call_kwargs)
                    torch.cuda.synchronize()
                    recorded_peak = torch.cuda.max_memory_allocated() - start_level
                measured = memopt.measure(model, *call_args, **call_kwargs, repeat=args.repeat)
                peak = recorded_peak if graphs else measured.peak_bytes
                groups = next((r.rewrites for r in report.passes if r.name == "slicing"), 0) if report else 0
                # Fastest timed call: on a shared machine other jobs only ever add time.
                rows[name] = (peak, min(measured.times_s), error, compile_s, groups)
                print(
                    f"{kind} {name}: peak {peak / 2**20:.1f} MiB, {rows[name][1] * 1e3:.1f} ms, error {error:.1e}, "
                    f"compile {compile_s:.0f} s, groups {groups}", file=sys.stderr, flush=True,
                )
            except Exception as error:  # a variant that fails is reported, not fatal
                rows[name] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
                print(f"{kind} {name}: {rows[name]}", file=sys.stderr, flush=True)
    return rows


REHASH_MODELS = ("unet3d", "animatediff", "svd")
COMPILED_FULL = "compiled: full"


def rehash_row(kind, args, device, dtype):
    import diffusers

    from memopt.diffusion import StepRehash

    if kind not in REHASH_MODELS:
        raise SystemExit(f"--rehash-models: unknown model {kind!r}; valid: {', '.join(REHASH_MODELS)}")
    channels = tuple(int(c) for c in args.rehash_channels.split(","))
    torch.manual_seed(0)
    unet = build(kind, channels, args.frames).eval().to(device, dtype)
    (sample, _, context), extra = inputs(kind, args.frames, args.size, channels[0], device, dtype)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(args.steps)
    # SVD denoises 4 latent channels and feeds the UNet the conditioning image's latents beside
    # them (``[batch, frames, 4 + 4, h, w]``), as its pipeline does; DDIM stands in for its
    # Euler sampler (the same UNet calls per step).
    latents, image = (sample[:, :, :4], sample[:, :, 4:]) if kind == "svd" else (sample, None)

    def denoise(model, x, t):
        x_in = x if image is None else torch.cat([x, image], dim=2)
        return model(x_in, t, encoder_hidden_states=context, **extra).sample

    def loop(model, timesteps=None):
        x = latents.clone()
        for t in scheduler.timesteps if timesteps is None else timesteps:
            x = scheduler.step(denoise(model, x, t), t, x).prev_sample
        return x

    # Whole outer block pair (layers=None) and the finer cut at a skip connection inside it.
    loops = [("full", lambda: unet)]
    for layers in (None, *(int(k) for k in filter(None, args.rehash_layers.split(",")))):
        cut = "" if layers is None else f", layers={layers}"
        loops += [
            (f"rehash interval={args.interval}{cut}", lambda layers=layers: StepRehash(unet, interval=args.interval, layers=layers)),
            (f"rehash threshold={args.threshold}{cut}", lambda layers=layers: StepRehash(unet, threshold=args.threshold, layers=layers)),
        ]
    if args.rehash_compiled:
        # What a user runs: the UNet compiled (memopt's defaults), against Step Rehash with its
        # blocks compiled by the same backend (memopt.compile(unet, step_rehash=...)).
        layers = next((int(k) for k in filter(None, args.rehash_layers.split(","))), None)
        cut = "" if layers is None else f", layers={layers}"
        rehash = {"interval": args.interval, "layers": layers}
        loops += [
            (COMPILED_FULL, lambda: memopt.compile(unet)),
            (f"compiled: rehash interval={args.interval}{cut}", lambda: memopt.compile(unet, step_rehash=rehash)),
        ]
    results = {}
    # One wrapper per loop, kept across the runs, as a pipeline keeps ``pipe.unet`` across
    # generations: each run is a new generation (the wrapper resets when the timesteps go up
    # again), and only the first pays the wrapper's one-time cache check (one extra shallow
    # pass: StepRehash._shrink_cache). The fastest run is the steady state.
    models = {name: make() for name, make in loops}
    with torch.no_grad():
        denoise(unet, latents, scheduler.timesteps[0])  # warm-up: first-call costs
        for name, model in models.items():
            if name.startswith("compiled"):
                # Compile outside the timed runs: a short generation reaches a full step, the
                # rehash steps after it and the next full step (and pays the one-time check).
                loop(model, scheduler.timesteps[: args.interval + 2])
        # Loops interleaved and repeated, fastest kept: shared machines make single runs noisy.
        for _ in range(args.loop_repeat):
            for name, model in models.items():
                full_before = getattr(model, "full_steps", 0)
                begin = time.perf_counter()
                final = loop(model)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - begin
                best = results.get(name, (float("inf"),))[0]
                full_steps = getattr(model, "full_steps", full_before + args.steps) - full_before
                results[name] = (min(best, seconds), final, full_steps)
    return results


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="unet3d,animatediff,svd")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1, help="2: a pipeline's batch under classifier-free guidance")
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--channels", default="32,64,64")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--rehash-channels", default="32,64,64", help="block_out_channels of the Step Rehash UNet")
    parser.add_argument(
        "--rehash-layers", default="1",
        help="comma-separated StepRehash layers= cuts to time besides the whole outer block pair",
    )
    parser.add_argument("--rehash-models", default=",".join(REHASH_MODELS), help="UNets of the Step Rehash loops")
    parser.add_argument("--loop-repeat", type=int, default=2, help="runs of each denoising loop (fastest kept)")
    parser.add_argument("--skip-rehash", action="store_true")
    parser.add_argument(
        "--rehash-compiled", action="store_true",
        help="also time the loops compiled: the UNet by memopt.compile, and memopt.compile(unet, step_rehash=...) "
        "with the first --rehash-layers cut (compiled before timing; speed-up against the compiled full loop)",
    )
    parser.add_argument(
        "--compile-body", default="default", choices=tuple(COMPILE_BODY),
        help="slicing's compile_body for the memopt variant (default: on under the Inductor lowering)",
    )
    parser.add_argument(
        "--cudagraphs", action="store_true",
        help="CUDA only: also time Inductor and memopt replayed as CUDA graphs (peak read while recording)",
    )
    parser.add_argument(
        "--variants", default=None,
        help="comma-separated subset of eager, inductor, memopt (and with --cudagraphs inductor-cudagraphs, "
        "memopt-cudagraphs); default: all",
    )
    parser.add_argument("--out", default=None, help="folder for the markdown result")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads (torch.set_num_threads); 1 keeps timings stable on a shared machine",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    import diffusers

    lines = [
        f"# slicing benchmark ({datetime.date.today()})",
        "",
        f"device: {device_name}; torch {torch.__version__}; diffusers {diffusers.__version__}; "
        f"python {platform.python_version()}; dtype {dtype}",
        f"one denoising step, batch {args.batch}, {args.frames} frames, latents {args.size}x{args.size}, "
        f"block_out_channels ({args.channels}), random weights",
        "",
        f"peak: memopt.measure ({'CUDA peak statistics' if device.type == 'cuda' else 'CPU allocator events'}); "
        f"time: fastest of {max(args.repeat - 1, 1)} calls after compiling"
        + ("; *-cudagraphs rows: peak over the warm-up, recording and first replay calls" if args.cudagraphs else ""),
        "",
        "| model | variant | peak memory | vs Inductor | time | vs Inductor | rel. error vs eager | groups | compile s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind in filter(None, args.models.split(",")):  # --models "": Step Rehash only
        rows = step_row(kind, args, device, dtype)
        if isinstance(rows["inductor"], str):
            lines.append(f"| {kind} | inductor | {rows['inductor']} | | | | | | |")
            continue
        base_peak, base_time = rows["inductor"][0], rows["inductor"][1]
        for name, row in rows.items():
            if isinstance(row, str):
                lines.append(f"| {kind} | {name} | {row} | | | | | | |")
                continue
            peak, seconds, error, compile_s, groups = row
            lines.append(
                f"| {kind} | {name} | {peak / 2**20:.1f} MiB | {base_peak / max(peak, 1):.2f}x lower | "
                f"{seconds * 1e3:.0f} ms | {seconds / base_time:.2f}x | {error:.1e} | {groups} | {compile_s:.0f} |"
            )
        print("\n".join(lines[-3:]), file=sys.stderr, flush=True)
    compiled = " (rows 'compiled:' compiled by memopt, compared with the compiled full loop)" if args.rehash_compiled else ""
    for kind in () if args.skip_rehash else filter(None, args.rehash_models.split(",")):
        results = rehash_row(kind, args, device, dtype)
        lines += [
            "",
            f"Step Rehash, {kind} (block_out_channels ({args.rehash_channels})), {args.frames} frames, "
            f"latents {args.size}x{args.size}, {args.steps} DDIM steps, eager modules{compiled}, fastest of {args.loop_repeat} runs "
            "(one wrapper per loop across the runs: only the first pays its one-time cache check):",
            "",
            "| loop | full steps | time | speed-up | final latents rel. L2 diff vs full |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, (seconds, final, full_steps) in results.items():
            # Compiled loops are compared with the compiled full loop, the rest with the eager one.
            base_time, base_final, _ = results[COMPILED_FULL] if name.startswith("compiled") else results["full"]
            diff = ((final.float() - base_final.float()).norm() / base_final.float().norm()).item()
            lines.append(f"| {name} | {full_steps} | {seconds:.2f} s | {base_time / seconds:.2f}x | {diff:.3e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        tag = "cuda" if device.type == "cuda" else "cpu"
        path = Path(args.out) / f"slicing-{datetime.date.today()}-{tag}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


if __name__ == "__main__":
    main()
