"""The TF front end's numbers on `cases.py`'s inputs, for the Keras 3 tests to agree with.

    python tests/keras3/tf_reference.py OUT.json     # in a process with Keras 2 (tf_keras)

`tests/test_keras3.py` computes them in the main suite's process (which runs the TF front end
already) and hands the file to the Keras 3 subprocesses; run alone, the Keras 3 tests start
this script themselves.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tfnegcache  # noqa: E402  first: selects Keras 2

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import cases  # noqa: E402

SPEC = {"item_id": tf.TensorSpec([], tf.int64)}


def _cache(size, seed=0):
    return tfnegcache.NegativeCache(size, SPEC, cases.DIM, seed=seed)


def _insert(cache, ids, rows):
    ids = tf.constant(ids, tf.int64)
    cache.insert({"item_id": ids}, tf.constant(rows), ids)


def fifo():
    cache = _cache(cases.FIFO_SIZE)
    states = []
    for i, ids in enumerate(cases.FIFO_CALLS):
        _insert(cache, ids, cases.fifo_rows(i, ids))
        states.append({"ids": cache.ids.numpy().tolist(),
                       "embeddings": cache.embeddings.numpy().tolist(),
                       "cursor": int(cache.cursor.numpy()),
                       "num_filled": int(cache.num_filled.numpy())})
    insert_ids = tf.constant(cases.UPDATE_INSERT, tf.int64)
    wb = cases.UPDATE_WRITE_BACK_SLOTS
    cache.update(tfnegcache.CacheUpdate(
        insert_features={"item_id": insert_ids},
        insert_embeddings=cases.update_rows(len(insert_ids), 500.0), insert_ids=insert_ids,
        write_back_slots=tf.constant(wb, tf.int64),
        write_back_embeddings=cases.write_back_rows(wb),
        write_back_valid=tf.constant(cases.UPDATE_WRITE_BACK_VALID),
        refresh_slots=tf.constant(cases.UPDATE_REFRESH_SLOTS, tf.int64),
        refresh_embeddings=cases.update_rows(len(cases.UPDATE_REFRESH_SLOTS), 700.0)),
        advance_step=False)
    states.append({"ids": cache.ids.numpy().tolist(),
                   "embeddings": cache.embeddings.numpy().tolist(),
                   "cursor": int(cache.cursor.numpy()),
                   "num_filled": int(cache.num_filled.numpy())})
    return states


def log_mass():
    case = cases.log_mass_case()
    out = {}
    for block_size in (None, 4):
        cache = tfnegcache.NegativeCache(case["size"], SPEC, cases.DIM, block_size=block_size)
        _insert(cache, case["ids"], case["embeddings"])
        mass = cache.log_mass(tf.constant(case["queries"]), case["temperature"],
                              tf.constant(case["masked"], tf.int64),
                              tf.constant(case["excluded"], tf.int64))
        out[str(block_size)] = mass.numpy().tolist()
    return out


def in_batch():
    case = cases.in_batch_case()
    out = {}
    for name, variant in cases.IN_BATCH_VARIANTS.items():
        variant = dict(variant)
        logq = variant.pop("logq", False)
        weighted = variant.pop("sample_weight", False)
        task = tfnegcache.CacheRetrieval(**variant)
        loss = task(tf.constant(case["queries"]), tf.constant(case["candidates"]),
                    candidate_ids=tf.constant(case["ids"], tf.int64),
                    candidate_sampling_probability=(tf.constant(case["probability"])
                                                    if logq else None),
                    sample_weight=tf.constant(case["sample_weight"]) if weighted else None,
                    compute_metrics=False)
        out[name] = float(loss.numpy())
    return out


class _Table(tf.keras.layers.Layer):
    def __init__(self, table):
        super().__init__()
        self.table = tf.Variable(table)

    def call(self, features):
        return tf.gather(self.table, features["item_id"])


def with_cache():
    case = cases.cache_case()
    out = {}
    for name, variant in cases.CACHE_VARIANTS.items():
        variant = dict(variant)
        logq = variant.pop("logq", False)
        tower = _Table(case["table"])
        cache = _cache(16)
        task = tfnegcache.CacheRetrieval(cache=cache, candidate_model=tower, **variant)
        ids = tf.constant(case["cached"], tf.int64)
        cache.insert({"item_id": ids}, tower({"item_id": ids}), ids)
        tower.table.assign(case["moved"])
        batch = tf.constant(case["batch"], tf.int64)
        loss = task(tf.constant(case["queries"]), tower({"item_id": batch}),
                    candidate_ids=batch, candidate_features={"item_id": batch},
                    candidate_sampling_probability=(tf.constant(case["probability"])
                                                    if logq else None),
                    compute_metrics=False, training=False)
        out[name] = float(loss.numpy())
    return out


def shifted():
    case = cases.shifted_case()
    out = {}
    for estimator in ("corrected", "stale"):
        for k in (1, 3):
            tower = _Table(case["table"])
            cache = _cache(len(case["table"]))
            per_query = tf.keras.losses.CategoricalCrossentropy(
                from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
            task = tfnegcache.CacheRetrieval(
                loss=per_query, cache=cache, candidate_model=tower, num_negatives=k,
                use_in_batch_negatives=False, estimator=estimator)
            ids = tf.range(len(case["table"]), dtype=tf.int64)
            cache.insert({"item_id": ids}, tower({"item_id": ids}), ids)
            tower.table.assign(case["moved"])
            positives = tf.constant(case["positives"], tf.int64)
            with tfnegcache.step.recording():
                loss = task(tf.constant(case["queries"]), tower({"item_id": positives}),
                            candidate_ids=positives, candidate_features={"item_id": positives},
                            training=True)
            out[f"{estimator}/{k}"] = loss.numpy().tolist()
    return out


def compute():
    return {"fifo": fifo(), "log_mass": log_mass(), "in_batch": in_batch(),
            "with_cache": with_cache(), "shifted": shifted()}


if __name__ == "__main__":
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        json.dump(compute(), f)
