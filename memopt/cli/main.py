"""The ``memopt`` command: ``memopt inspect`` and ``memopt demo``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from collections.abc import Sequence

import torch

from memopt.cli.targets import DTYPES, INTEGER_INPUT_HIGH, TargetError, build_model, make_input, parse_dtype, parse_input


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (TargetError, ValueError) as error:
        print(f"memopt {args.command}: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memopt", description="memopt: fit models in less memory.")
    commands = parser.add_subparsers(dest="command")

    inspect = commands.add_parser(
        "inspect",
        help="show graphs, graph breaks, ops, memory estimates and what each pass does",
        description="Compile a model with memopt and report what it sees and does.",
    )
    inspect.add_argument("target", help="package.module:factory or path/to/file.py:factory (returns an nn.Module)")
    inspect.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="SHAPE",
        help=f"an input shape like 2x3x32x32, optionally ':dtype' (8x128:int64 gives ids in [0, {INTEGER_INPUT_HIGH})); repeat per input",
    )
    inspect.add_argument("--dtype", default="float32", help=f"model and float input dtype ({', '.join(DTYPES)})")
    inspect.add_argument("--train", action="store_true", help="inspect a training step (forward + backward)")
    inspect.add_argument("--options", default="{}", metavar="JSON", help="memopt options as a JSON object")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--plot", metavar="FILE.png", help="write a PNG of live bytes before/after the passes")
    inspect.add_argument("--seed", type=int, default=0, help="seed for the random inputs")
    inspect.set_defaults(run=_run_inspect)

    demo = commands.add_parser(
        "demo",
        help="compare eager, Inductor and memopt on a built-in model (memory, time, accuracy)",
    )
    demo.add_argument("--json", action="store_true", help="print the table as JSON")
    demo.add_argument("--repeat", type=_positive_int, default=3, help="timed runs per measurement (>= 1)")
    demo.set_defaults(run=_run_demo)
    return parser


def _run_inspect(args: argparse.Namespace) -> int:
    from memopt.cli.inspect import format_text, inspect_model, plot_timelines

    dtype = parse_dtype(args.dtype)
    if not dtype.is_floating_point:
        raise TargetError(f"--dtype must be a floating dtype, got {args.dtype!r}")
    shapes = [parse_input(spec, dtype) for spec in args.input]
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as error:
        raise TargetError(f"--options is not valid JSON: {error}") from error
    if not isinstance(options, dict):
        raise TargetError("--options must be a JSON object, e.g. '{\"memory_budget\": 0.5}'")
    model = build_model(args.target).to(dtype)
    generator = torch.Generator().manual_seed(args.seed)
    inputs = []
    for spec, (shape, input_dtype) in zip(args.input, shapes):
        try:
            inputs.append(make_input(shape, input_dtype, generator))
        except (RuntimeError, MemoryError) as error:
            size = math.prod(shape) * torch.empty((), dtype=input_dtype).element_size()
            raise TargetError(f"cannot make the input {spec!r} ({size:,} bytes): {_root_cause(error)}") from error
    if args.plot:
        if not os.path.splitext(args.plot)[1]:
            args.plot += ".png"  # what matplotlib would write; said as it is below
        _check_plot_path(args.plot)  # before the inspection, which can take minutes
    try:
        result = inspect_model(model, inputs, options, train=args.train)
    except (TargetError, ValueError):
        raise
    except Exception as error:
        raise TargetError(f"inspecting {args.target!r} failed: {_root_cause(error)}") from error
    result["target"] = args.target
    result["inputs"] = args.input
    if args.plot:
        try:
            plot_timelines(result, args.plot, args.target)
        except OSError as error:
            raise TargetError(f"cannot write the plot {args.plot!r}: {error.strerror or error}") from error
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(format_text(result, args.target))
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0


def _root_cause(error: BaseException) -> str:
    """``Type: first line`` of the innermost cause: Dynamo wraps what a backend or a traced
    op raised (``BackendCompilerFailed``, ``TorchRuntimeError``) in messages of its own."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "inner_exception", None) or error.__cause__
        if inner is None:
            break
        error = inner
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _check_plot_path(path: str) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise TargetError("--plot needs matplotlib: pip install 'memopt[plot]' (or matplotlib)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise TargetError(f"cannot write the plot {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise TargetError(f"cannot write the plot {path!r}: folder {folder!r} is not writable")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _run_demo(args: argparse.Namespace) -> int:
    from memopt.demo import format_table, run_demo

    rows = run_demo(repeat=args.repeat)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
