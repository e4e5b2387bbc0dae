"""AutoGraph leaves the library's functions as they are (`tfnegcache/_autograph.py`), converts
the user's code around them, and the graph is the same either way."""

import builtins

import numpy as np
import tensorflow as tf
from tensorflow.python.autograph.core import config
from tensorflow.python.autograph.impl import conversion

import tfnegcache
from tfnegcache import _autograph
import toy


def _rules_for_us():
    return [r for r in config.CONVERSION_RULES if getattr(r, "_prefix", None) == "tfnegcache"]


def test_the_library_is_left_unconverted_and_user_code_is_not():
    tfnegcache.CacheRetrieval   # the first use of a name adds the rule
    assert len(_rules_for_us()) == 1
    assert _autograph.leave_unconverted()
    assert len(_rules_for_us()) == 1          # added once
    for fn in (tfnegcache.sampling.sample_cache, tfnegcache.step.run_step,
               tfnegcache.CacheRetrieval.call, tfnegcache.NegativeCache.update):
        assert conversion.is_allowlisted(fn), fn
    assert not conversion.is_allowlisted(toy.ToyModel.compute_loss)


def _fit_losses():
    tf.keras.utils.set_random_seed(0)
    model = toy.ToyModel(cache_size=128)
    model.compile(tf.keras.optimizers.Adam(0.05))
    history = model.fit(toy.dataset(toy.interactions(64 * 4, seed=1), 64), epochs=2, verbose=0)
    return history.history["loss"], model.task.cache.ids.numpy()


def test_training_is_the_same_with_the_library_converted(monkeypatch):
    unconverted = _fit_losses()
    monkeypatch.setattr(config, "CONVERSION_RULES",
                        tuple(r for r in config.CONVERSION_RULES
                              if getattr(r, "_prefix", None) != "tfnegcache"))
    assert not conversion.is_allowlisted(tfnegcache.sampling.sample_cache)
    converted = _fit_losses()
    assert unconverted[0] == converted[0]
    np.testing.assert_array_equal(unconverted[1], converted[1])


def test_without_autograph_s_private_rules_nothing_breaks(monkeypatch):
    real_import = builtins.__import__

    def no_config(name, *args, **kwargs):
        if name.startswith("tensorflow.python.autograph.core"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_config)
    assert _autograph.leave_unconverted() is False


class BranchingToy(toy.ToyModel):
    """A `compute_loss`, and a candidate tower function, that need AutoGraph: a Python `if` on
    a tensor, and `len` of a tensor's shape (as TFRS's own retrieval task has)."""

    def compute_loss(self, features, training=False):
        loss = super().compute_loss(features, training=training)
        if tf.reduce_sum(loss) > 1e9:          # a tensor condition: tf.cond once converted
            loss = loss * 0.0
        return loss


def test_the_user_s_code_the_library_calls_is_still_converted():
    model = BranchingToy(cache_size=128)
    tower = model.task.candidate_model

    def candidate_model(features):
        if len(tf.shape(features["item_id"])) != 1:   # `len` of a tensor: converted only
            raise ValueError("item ids must be a vector")
        return tower(features)
    model.task.candidate_model = candidate_model
    model.compile(tf.keras.optimizers.Adam(0.05))
    history = model.fit(toy.dataset(toy.interactions(64 * 4, seed=1), 64), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][1] < history.history["loss"][0]
    assert np.isfinite(model.evaluate(toy.dataset(toy.interactions(64, seed=2), 64),
                                      verbose=0, return_dict=True)["loss"])
