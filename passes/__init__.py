"""memopt's graph passes, in the one order the driver runs them.

Each pass is a :class:`GraphPass` defined in its own module here; ``PASSES`` below lists
them in execution order. The rules every pass obeys are in ``README.md`` beside this file.
"""

from memopt.passes.base import GraphPass, PassContext
from memopt.passes.monarch import MONARCH
from memopt.passes.im2win import IM2WIN
from memopt.passes.slicing import SLICING
from memopt.passes.reversible import REVERSIBLE, REVERSIBLE_CONVERT

# Fixed order: passes that change the architecture first (they create the structure later
# passes look for), then the exact memory/speed rewrites; slicing (inference graphs) groups
# whatever ops the earlier passes produced.
#   reversible-convert* · monarch* · im2win · slicing · reversible      (* = opt-in)
# ``reversible`` (the coupling-chain rewrite for training graphs) runs last, so the blocks it
# wraps already hold whatever ops the other passes chose for them.
PASSES: tuple[GraphPass, ...] = (
    REVERSIBLE_CONVERT,
    MONARCH,
    IM2WIN,
    SLICING,
    REVERSIBLE,
)

__all__ = ["PASSES", "GraphPass", "PassContext"]
