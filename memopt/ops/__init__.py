from memopt.ops import monarch  # noqa: F401  (registers torch.ops.memopt.monarch_matmul)
