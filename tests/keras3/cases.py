"""Small inputs both front ends are run on (numpy only, importable under either Keras).

`tf_reference.py` computes the TF front end's numbers for them (in a Keras 2 process), the
Keras 3 tests compute theirs and compare to float32 tolerance.
"""

import numpy as np

DIM = 4

# ---------------------------------------------------------------- the FIFO, write-back order

FIFO_SIZE = 8
# One insert per call: ids (with repeats), in the order given. Covers: duplicates within a
# call (the last row wins), cached ids refreshing their slot, new ids skipping slots a cached
# id of the same call refreshes, the ring wrapping, evictions, and more distinct ids than
# slots (the 8 whose last rows come latest are kept).
FIFO_CALLS = [
    [3, 5, 3, 7],
    [9, 5, 11, 13, 9],
    [15, 3, 17, 19, 21],
    [23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43, 45],
    [43, 47, 23, 49, 47],
]


def fifo_rows(call_index, ids):
    """`[M, DIM]` embeddings of one call's rows: distinct per (call, row)."""
    rows = np.arange(len(ids), dtype=np.float32)
    base = 100.0 * call_index + rows
    return np.stack([base + 0.25 * j for j in range(DIM)], 1).astype(np.float32)


# After the FIFO calls: one update with an insert, write-backs and refreshes that collide.
UPDATE_INSERT = [49, 51]           # 49 is cached (refreshes its slot), 51 is new
UPDATE_WRITE_BACK_SLOTS = [0, 2, 2, 6, 1, 7]
UPDATE_WRITE_BACK_VALID = [True, True, True, False, True, True]
UPDATE_REFRESH_SLOTS = [2, 4, 5]


def update_rows(num, offset):
    return (offset + np.arange(num * DIM, dtype=np.float32).reshape(num, DIM) / 8.0)


def write_back_rows(slots, offset=600.0):
    """Rows of a write-back: a function of the slot, as in training, where two draws of one
    slot re-encode the same features with the same weights."""
    slots = np.asarray(slots, np.float32)[:, None]
    return (offset + slots + np.arange(DIM, dtype=np.float32)[None, :] / 4.0).astype(np.float32)


# ---------------------------------------------------------------- the log-mass


def log_mass_case():
    """A 50-slot cache with 40 filled, three masked ids and one excluded id per query."""
    rng = np.random.default_rng(0)
    ids = (np.arange(40) * 3 + 1).astype(np.int32)
    embeddings = rng.normal(size=(40, DIM)).astype(np.float32)
    queries = rng.normal(size=(3, DIM)).astype(np.float32)
    masked = np.array([4, 61, 1000], np.int32)        # 1000 is not cached
    excluded = np.array([7, 2000, 1], np.int32)       # 2000 is not cached
    return dict(size=50, ids=ids, embeddings=embeddings, queries=queries, masked=masked,
                excluded=excluded, temperature=0.5)


# ---------------------------------------------------------------- the in-batch loss

IN_BATCH_VARIANTS = {
    "plain": {},
    "temperature": {"temperature": 0.5},
    "logq": {"logq": True},
    "accidental_hits": {"remove_accidental_hits": True},
    "hard_negatives": {"num_hard_negatives": 3},
    "sample_weight": {"sample_weight": True},
    "everything": {"temperature": 0.7, "logq": True, "remove_accidental_hits": True,
                   "num_hard_negatives": 4, "sample_weight": True},
}


def in_batch_case():
    """Five queries, seven candidates (the first five the positives; ids repeat)."""
    rng = np.random.default_rng(1)
    return dict(
        queries=rng.normal(size=(5, DIM)).astype(np.float32),
        candidates=rng.normal(size=(7, DIM)).astype(np.float32),
        ids=np.array([1, 2, 3, 2, 4, 1, 5], np.int32),
        probability=np.array([0.1, 0.3, 0.05, 0.3, 0.2, 0.1, 0.02], np.float32),
        sample_weight=np.array([1.0, 0.5, 2.0, 1.0, 0.0], np.float32))


# ---------------------------------------------------------------- the loss with a cache

CACHE_VARIANTS = {
    "in_batch": {"use_in_batch_negatives": True},
    "cache_only": {"use_in_batch_negatives": False},
    "temperature": {"use_in_batch_negatives": True, "temperature": 0.5},
    "logq": {"use_in_batch_negatives": True, "logq": True},
}


def cache_case(seed=0):
    """A 16-slot cache over a 16-item table, 10 items cached, then the table moved (stale);
    a batch of 3 (2 and 5 cached, 12 not)."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(16, DIM)).astype(np.float32)
    cached = np.arange(10, dtype=np.int32)
    moved = table + 0.1
    queries = np.random.default_rng(1).normal(size=(3, DIM)).astype(np.float32)
    batch = np.array([2, 5, 12], np.int32)
    probability = np.array([0.2, 0.1, 0.05], np.float32)
    return dict(table=table, cached=cached, moved=moved, queries=queries, batch=batch,
                probability=probability)


def shifted_case(num_items=10, seed=0):
    """Every cached embedding off by the same vector `w` (stale = fresh - w): the corrected
    estimator's value is then exact for any draw (tests/test_defaults.py)."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(num_items, DIM)).astype(np.float32)
    w = rng.normal(size=(1, DIM)).astype(np.float32)
    queries = rng.normal(size=(3, DIM)).astype(np.float32)
    return dict(table=table, moved=table + w, queries=queries,
                positives=np.array([2, 5, 7], np.int32))
