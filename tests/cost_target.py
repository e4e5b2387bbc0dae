"""`python -m tfnegcache cost cost_target:make` in tests/test_cost.py: the toy model with a
filled cache, and one batch."""

import tfnegcache  # noqa: F401  (first: Keras 2)

import tensorflow as tf

import toy


def make():
    model = toy.ToyModel(cache_size=256)
    model.compile(tf.keras.optimizers.Adam(0.05))
    model.task.cache.warm_start(tf.data.Dataset.from_tensor_slices(toy.item_table()),
                                model.candidate_tower, id_key="item_id")
    data = toy.interactions(128, seed=0)
    return model, {k: tf.constant(v) for k, v in data.items()}
