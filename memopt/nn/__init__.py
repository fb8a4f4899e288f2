"""Modules for people who build memory-efficient models by hand (applied before compiling)."""

from memopt.nn.monarch import MonarchLinear, MonarchReplacement, monarchize
from memopt.nn.reversible import (  # noqa: F401
    ReversibleMBConv2d,
    ReversibleMBConv3d,
    ReversibleSequential,
    RevCoupling,
)
