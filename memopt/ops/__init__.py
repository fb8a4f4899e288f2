from memopt.ops import reversible  # noqa: F401  (registers memopt::reversible_chain)
