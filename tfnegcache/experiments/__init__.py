"""Experiments on real data: `movielens` is the job behind `python -m tfnegcache train`."""

# Here, not in `movielens`, so that the CLI can check --strategies before TensorFlow loads.
STRATEGIES = ("in-batch", "in-batch-logq", "full-softmax", "negative-cache")
