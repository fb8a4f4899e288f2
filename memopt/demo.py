"""``memopt demo``: memopt's main job on a built-in model, side by side with eager and Inductor.

The demo model is a small vision transformer with a convolutional stem: convolutions, a
stack of residual blocks and wide MLPs, the structures memopt's passes target. Each row
compiles a fresh copy of the model (same weights), runs inference and one training step,
and reports measured peak memory (``memopt.measure``), time, and the largest difference to
eager (outputs for inference; gradients for training).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memopt.backend import memopt_backend
from memopt.config import Config
from memopt.measure import measure
from memopt.report import collect_reports, format_bytes


class ConvStem(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels // 2, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(channels // 2)
        self.conv2 = nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DemoNet(nn.Module):
    """Conv stem -> patch tokens -> transformer blocks -> mean-pooled classifier."""

    def __init__(self, channels: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: int = 4, classes: int = 10):
        super().__init__()
        self.stem = ConvStem(channels)
        self.blocks = nn.ModuleList(Block(channels, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(images).flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens).mean(1))


DEMO_DEPTH = 2
DEMO_BATCH = 16
DEMO_IMAGE_SIZE = 64


def demo_model() -> DemoNet:
    """The demo's model (also a valid ``memopt inspect`` target: ``memopt.demo:demo_model``)."""
    torch.manual_seed(0)
    return DemoNet(depth=DEMO_DEPTH)


# Each row: a label, then how to compile (None = eager), and memopt options where relevant.
ROWS: list[tuple[str, str | None, dict[str, Any]]] = [
    ("eager", None, {}),
    ("inductor", "inductor", {}),
    ("memopt", "memopt", {}),
    ("memopt memory_budget=0.3", "memopt", {"memory_budget": 0.3}),
    # Opt-in passes that change results on purpose: their difference to eager is the change.
    ("memopt reversible=convert", "memopt", {"reversible": "convert"}),
    ("memopt monarch (inference)", "memopt", {"monarch": {"nblocks": 4, "min_features": 128}}),
]


def run_demo(batch: int = DEMO_BATCH, image_size: int = DEMO_IMAGE_SIZE, repeat: int = 3) -> list[dict[str, Any]]:
    """Measure every row of ``ROWS`` on ``demo_model`` and return one dict per row."""
    base = demo_model()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)

    reference = _run_row(base, None, {}, images, labels, repeat)
    rows = []
    for label, backend, options in ROWS:
        measured = reference if backend is None else _run_row(base, backend, options, images, labels, repeat)
        rows.append(
            {
                "row": label,
                "compile_s": measured["compile_s"],
                "inference_peak_bytes": measured["inference"].peak_bytes,
                "inference_ms": measured["inference"].time_s * 1e3,
                "inference_max_diff": (measured["output"] - reference["output"]).abs().max().item(),
                "train_peak_bytes": measured["train"].peak_bytes,
                "train_ms": measured["train"].time_s * 1e3,
                "grad_max_diff": max(
                    (g - r).abs().max().item() for g, r in zip(measured["grads"], reference["grads"])
                ),
                "passes": measured["passes"],
            }
        )
    return rows


def _run_row(
    base: nn.Module,
    backend: str | None,
    options: dict[str, Any],
    images: torch.Tensor,
    labels: torch.Tensor,
    repeat: int,
) -> dict[str, Any]:
    model = copy.deepcopy(base)
    torch._dynamo.reset()
    compiled: Callable[..., torch.Tensor]
    if backend is None:
        compiled = model
    elif backend == "memopt":
        compiled = torch.compile(model, backend=memopt_backend, options=Config.from_options(options))
    else:
        compiled = torch.compile(model, backend=backend)

    def inference() -> torch.Tensor:
        with torch.no_grad():
            return compiled(images)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(compiled(images), labels).backward()

    model.eval()
    with collect_reports() as reports:
        start = time.perf_counter()
        inference()
        model.train()
        train_step()
        compile_s = time.perf_counter() - start
    model.eval()
    inference_measured = measure(inference, repeat=repeat)
    model.train()
    train_measured = measure(train_step, repeat=repeat)
    # Gradients of one step from the common starting weights (BatchNorm statistics moved on
    # during the timed steps, so redo the step from a fresh copy of the base weights).
    model.load_state_dict(base.state_dict())
    train_step()
    passes = sorted(
        {
            f"{r.name} x{r.rewrites}{'*' if r.changes_results else ''}"
            for report in reports
            for r in report.passes
            if r.rewrites
        }
    )
    return {
        "compile_s": compile_s if backend else 0.0,
        "inference": inference_measured,
        "train": train_measured,
        "output": inference_measured.result,
        "grads": [p.grad.detach().clone() for p in model.parameters()],
        "passes": ", ".join(passes) or "-",
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The demo's rows as a markdown table."""
    header = (
        "| | compile s | inference peak | inference ms | max diff | train-step peak | train ms | max grad diff | passes applied |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )
    lines = [
        f"memopt demo: {DemoNet.__name__} (conv stem + {DEMO_DEPTH} transformer blocks), batch {DEMO_BATCH}, "
        f"{DEMO_IMAGE_SIZE}x{DEMO_IMAGE_SIZE} images, "
        f"torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU'} "
        f"({torch.get_num_threads()} threads)",
        "",
        header,
    ]
    for row in rows:
        lines.append(
            f"| {row['row']} | {row['compile_s']:.1f} | {format_bytes(row['inference_peak_bytes'])} | "
            f"{row['inference_ms']:.1f} | {row['inference_max_diff']:.1e} | "
            f"{format_bytes(row['train_peak_bytes'])} | {row['train_ms']:.1f} | {row['grad_max_diff']:.1e} | "
            f"{row['passes']} |"
        )
    lines.append("")
    lines.append(
        "* changes results on purpose (opt-in): its difference to eager is that change, "
        "measured and reported by the pass (`memopt inspect`)."
    )
    return "\n".join(lines)
