"""memopt: a torch.compile backend that makes models fit in less memory and run fast.

    model = torch.compile(model, backend="memopt")          # no import needed
    model = memopt.compile(model, memory_budget=0.5)        # same, with options
    print(memopt.last_report().summary())                   # what memopt changed
"""

import memopt.ops  # noqa: F401  (registers torch.ops.memopt.*)
from memopt.backend import compile, memopt_backend
from memopt.config import Config
from memopt.estimate import MemoryTimeline, estimate
from memopt.measure import Measurement, measure
from memopt.report import PassResult, Report, collect_reports, last_report

__version__ = "0.1.0"

__all__ = [
    "Config",
    "Measurement",
    "MemoryTimeline",
    "PassResult",
    "Report",
    "collect_reports",
    "compile",
    "estimate",
    "last_report",
    "measure",
    "memopt_backend",
]
