"""A target for `python -m tfnegcache cost` that returns the wrong thing (imports nothing)."""


def not_a_pair():
    return 3
