from memopt.nn.reversible import (  # noqa: F401
    ReversibleMBConv2d,
    ReversibleMBConv3d,
    ReversibleSequential,
    RevCoupling,
)
