"""tfnegcache's examples (installed as `tfnegcache_examples`): the MovieLens job behind
`python -m tfnegcache train` (`cli`, `movielens`), its offline data loader
(`movielens_data`), and the imports of the `examples` extra (`_extras`). Nothing here is
part of the library's API.
"""

# Here, not in `movielens`, so that the CLI can check --strategies before TensorFlow loads.
STRATEGIES = ("in-batch", "in-batch-logq", "full-softmax", "negative-cache")
