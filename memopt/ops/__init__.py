from memopt.ops import slicing  # noqa: F401  (registers torch.ops.memopt.slicing)
