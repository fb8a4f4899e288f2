"""Modules for people who build memory-efficient models by hand (applied before compiling)."""

from memopt.nn.monarch import MonarchLinear, MonarchReplacement, monarchize
