"""What memopt did to a graph: one ``PassResult`` per pass, gathered in a ``Report``."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("memopt")


@dataclasses.dataclass
class PassResult:
    """The outcome of one pass on one graph."""

    name: str
    rewrites: int = 0
    """Subgraphs the pass replaced."""
    bytes_saved: int = 0
    """Estimated bytes of peak memory saved by those rewrites."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """What the pass skipped and why, and anything a user should know (approximations)."""
    matched: int = 0
    """Candidate sites the pass looked at (rewritten or not)."""
    details: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Per-site rows (algorithm chosen, error measured, ...), for reports and tables."""
    error: str | None = None
    """Set when the pass raised and was skipped (the graph is then left as it was)."""
    changes_results: bool = False
    """True for opt-in passes that change results on purpose (notes say by how much)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    """What memopt did to one graph that Dynamo handed it."""

    graph_index: int
    training: bool
    device: str
    nodes_before: int
    nodes_after: int = 0
    op_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    """How often each op appears in the graph Dynamo captured (before the passes)."""
    peak_before: int = 0
    """Estimated peak bytes of intermediates (``memopt.estimate``) before the passes."""
    peak_after: int = 0
    """The same after the passes."""
    passes: list[PassResult] = dataclasses.field(default_factory=list)
    saved_activation_bytes: int | None = None
    """Training only: bytes the forward graph saves for the backward (graph inputs excluded)."""
    saved_activations: int | None = None
    """Training only: how many tensors the forward graph saves for the backward."""
    partition_notes: list[str] = dataclasses.field(default_factory=list)
    """Training only: where the partition differs from what the options asked, and why."""
    lowering_error: str | None = None
    """Why lowering the rewritten graph failed, when it did: the graph was then compiled
    without memopt's rewrites (their counts are zeroed, with a note)."""
    timeline_before: list[int] = dataclasses.field(default_factory=list, repr=False)
    timeline_after: list[int] = dataclasses.field(default_factory=list, repr=False)

    @property
    def rewrites(self) -> int:
        return sum(result.rewrites for result in self.passes)

    @property
    def bytes_saved(self) -> int:
        return sum(result.bytes_saved for result in self.passes)

    def to_dict(self, timelines: bool = False) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not timelines:
            data.pop("timeline_before")
            data.pop("timeline_after")
        return data

    def summary(self) -> str:
        """A few human-readable lines: the graph, what it saves for backward, each pass."""
        return format_report(self.to_dict())


def format_report(report: dict[str, Any], ops: bool = False, details: bool = False) -> str:
    """Lines describing one graph's report (a :meth:`Report.to_dict`), optionally with its op
    histogram and each pass's per-site rows (``memopt inspect`` shows both)."""
    kind = "training" if report["training"] else "inference"
    lines = [
        f"graph {report['graph_index']} ({kind}, {report['device']}): {report['nodes_before']} nodes -> "
        f"{report['nodes_after']}, estimated peak {format_bytes(report['peak_before'])} -> "
        f"{format_bytes(report['peak_after'])}"
    ]
    if report["saved_activation_bytes"] is not None:
        lines.append(
            f"  saved for backward: {report['saved_activations']} tensors, "
            f"{format_bytes(report['saved_activation_bytes'])}"
        )
    lines.extend(f"    - {note}" for note in report.get("partition_notes", ()))
    if report.get("lowering_error"):
        lines.append(f"  lowering the rewritten graph FAILED, compiled without the rewrites: {report['lowering_error']}")
    if ops:
        lines.append("  ops: " + ", ".join(f"{name} x{count}" for name, count in report["op_counts"].items()))
    for result in report["passes"]:
        status = "FAILED, skipped" if result["error"] else f"{result['rewrites']} rewritten"
        lines.append(
            f"  pass {result['name']}: {result['matched']} matched, {status}, "
            f"~{format_bytes(result['bytes_saved'])} saved"
            + (" [changes results]" if result["changes_results"] and result["rewrites"] else "")
        )
        if result["error"]:
            lines.append(f"    error: {result['error']}")
        lines.extend(f"    - {note}" for note in result["notes"])
        if details:
            lines.extend("    * " + ", ".join(f"{key}={value}" for key, value in row.items()) for row in result["details"])
    if not report["passes"]:
        lines.append("  no pass enabled")
    return "\n".join(lines)


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_state = threading.local()
_last: list[Report] = []


def record(report: Report) -> None:
    """Make ``report`` the last report, and hand it to any active :func:`collect_reports`."""
    _last[:] = [report]
    for sink in getattr(_state, "sinks", ()):
        sink.append(report)


def discard(report: Report) -> None:
    """Forget ``report`` (its graph was never compiled: Dynamo traces the frame again)."""
    if _last and _last[0] is report:
        _last.clear()
    for sink in getattr(_state, "sinks", ()):
        if any(item is report for item in sink):
            sink[:] = [item for item in sink if item is not report]


def last_report() -> Report | None:
    """The report of the most recent graph memopt compiled in this process (None if none)."""
    return _last[0] if _last else None


@contextmanager
def collect_reports() -> Iterator[list[Report]]:
    """Gather the reports of every graph compiled inside the ``with`` block, in order."""
    sink: list[Report] = []
    sinks = getattr(_state, "sinks", None)
    if sinks is None:
        sinks = _state.sinks = []
    sinks.append(sink)
    try:
        yield sink
    finally:
        # By identity: nested blocks' lists hold the same reports, so list.remove (by
        # equality) could take an outer block's list for this one.
        del sinks[next(i for i in reversed(range(len(sinks))) if sinks[i] is sink)]
