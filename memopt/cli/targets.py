"""Parsing what a user names on the command line: model factories and input shapes."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
INTEGER_INPUT_HIGH = 16
"""Integer inputs (token ids, labels) are drawn uniformly from [0, INTEGER_INPUT_HIGH)."""


class TargetError(ValueError):
    """A malformed command-line target, shape or dtype (printed as a one-line error)."""


def load_factory(target: str) -> Callable[[], torch.nn.Module]:
    """Resolve ``package.module:factory`` or ``path/to/file.py:factory`` to the factory."""
    module_part, sep, attribute = target.rpartition(":")
    if not sep or not module_part or not attribute:
        raise TargetError(
            f"target {target!r} must look like 'package.module:factory' or 'path/to/file.py:factory'"
        )
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise TargetError(f"target file {module_part!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"memopt_target_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise TargetError(f"cannot import {module_part!r} as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            raise TargetError(f"importing {module_part!r} failed: {type(error).__name__}: {error}") from error
    else:
        try:
            module = _import_from_here(module_part)
        except ImportError as error:
            raise TargetError(f"cannot import module {module_part!r}: {error}") from error
        except Exception as error:  # the module's own code raised (a SyntaxError, say)
            raise TargetError(f"importing {module_part!r} failed: {type(error).__name__}: {error}") from error
    factory = getattr(module, attribute, None)
    if factory is None:
        raise TargetError(f"module {module_part!r} has no attribute {attribute!r}")
    if not callable(factory):
        raise TargetError(f"{target!r} is not callable; it must be a factory returning an nn.Module")
    return factory


def _import_from_here(name: str) -> Any:
    """Import ``name`` as ``python -m`` would: the working directory's modules are found too
    (the ``memopt`` console script, unlike ``python``, does not put it on ``sys.path``). An
    installed module of the same name wins."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        here = os.getcwd()
        if error.name != name.partition(".")[0] or here in sys.path:
            raise
        sys.path.append(here)  # kept once the import works: the module may import its neighbours later
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as retry:
            sys.path.remove(here)
            if retry.name == error.name:
                raise error from None  # not here either: the first error says it
            raise


def build_model(target: str) -> torch.nn.Module:
    """Call the factory ``target`` names and check that it returns an ``nn.Module``."""
    factory = load_factory(target)
    try:
        model = factory()
    except Exception as error:
        raise TargetError(f"factory {target!r} raised {type(error).__name__}: {error}") from error
    if not isinstance(model, torch.nn.Module):
        raise TargetError(f"factory {target!r} returned {type(model).__name__}, not an nn.Module")
    return model


_SHAPE = re.compile(r"^\d+([x,]\d+)*$")


def parse_input(spec: str, default_dtype: torch.dtype) -> tuple[tuple[int, ...], torch.dtype]:
    """``2x3x32x32`` or ``2,3,32,32``, optionally ``:dtype`` (``8x128:int64`` for token ids)."""
    shape_text, sep, dtype_text = spec.partition(":")
    shape_text = shape_text.strip()
    if not _SHAPE.match(shape_text):
        raise TargetError(
            f"input shape {spec!r} must be sizes joined by 'x' or ',' (e.g. 2x3x32x32), "
            "optionally followed by ':dtype'"
        )
    shape = tuple(int(size) for size in re.split(r"[x,]", shape_text))
    if any(size >= 2**63 for size in shape):
        raise TargetError(f"input shape {spec!r}: sizes must be below 2**63")
    dtype = parse_dtype(dtype_text) if sep else default_dtype
    return shape, dtype


def parse_dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise TargetError(f"unknown dtype {text!r}; valid dtypes are: {', '.join(DTYPES)}")
    return DTYPES[text]


def make_input(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A fresh random input: normal for floating dtypes, uniform integers otherwise."""
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    return torch.randint(0, INTEGER_INPUT_HIGH, shape, generator=generator, dtype=dtype)
