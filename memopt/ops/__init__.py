"""memopt's custom operators, ``torch.ops.memopt.*``.

Importing this package registers every op (one module per op, each with fake, autograd,
CPU and CUDA implementations). Triton is imported lazily by the CUDA implementations, so
registering costs little and works without Triton.
"""

from memopt.ops import im2win_conv2d  # noqa: F401  (torch.ops.memopt.im2win_conv2d)
from memopt.ops import monarch  # noqa: F401  (registers torch.ops.memopt.monarch_matmul)
from memopt.ops import reversible  # noqa: F401  (registers memopt::reversible_chain)
from memopt.ops import slicing  # noqa: F401  (registers torch.ops.memopt.slicing)
