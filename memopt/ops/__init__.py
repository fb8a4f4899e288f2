from memopt.ops import im2win_conv2d  # noqa: F401  (torch.ops.memopt.im2win_conv2d)
