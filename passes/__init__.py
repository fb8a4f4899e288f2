"""memopt's graph passes, in the one order the driver runs them.

Each pass is a :class:`GraphPass` defined in its own module here; ``PASSES`` below lists
them in execution order. The rules every pass obeys are in ``README.md`` beside this file.
"""

from memopt.passes.base import GraphPass, PassContext
from memopt.passes.slicing import SLICING

# Fixed order: passes that change the architecture first (they create the structure later
# passes look for), then the exact memory/speed rewrites, slicing last (it groups whatever
# ops the earlier passes produced).
#   reversible-convert* · monarch* · sparse · im2win · slicing      (* = opt-in)
PASSES: tuple[GraphPass, ...] = (SLICING,)

__all__ = ["PASSES", "GraphPass", "PassContext"]
