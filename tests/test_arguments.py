"""Arguments checked at the door, empty batches, and messages that name the real problem."""

import numpy as np
import pytest
import tensorflow as tf

import tfnegcache
import toy
from test_transaction import assert_unchanged, full_state


def cache(**overrides):
    args = {"size": 16, "feature_spec": toy.FEATURE_SPEC, "embedding_dim": 4, **overrides}
    return tfnegcache.NegativeCache(**args)


@pytest.mark.parametrize("name,value,expected", [
    ("size", 16.5, "an integer >= 1"),
    ("size", "16", "an integer >= 1"),
    ("size", True, "an integer >= 1"),
    ("size", None, "an integer >= 1"),
    ("size", 0, "an integer >= 1"),
    ("embedding_dim", 4.7, "an integer >= 1"),
    ("block_size", 0, r"an integer in \[1, size\] or None"),
    ("block_size", -3, r"an integer in \[1, size\] or None"),
    ("block_size", 17, r"an integer in \[1, size\] or None"),
    ("block_size", 2.5, r"an integer in \[1, size\] or None"),
    ("block_size", "8", r"an integer in \[1, size\] or None"),
    ("seed", 1.5, "an integer"),
])
def test_cache_numbers_are_checked_at_construction(name, value, expected):
    with pytest.raises(ValueError, match=rf"`{name}` must be {expected}\. Received: "
                                         rf"{name}={value!r}\."):
        cache(**{name: value})


def test_numpy_integers_are_integers():
    built = cache(size=np.int64(16), embedding_dim=np.int32(4), block_size=np.int64(4))
    assert built.size == 16 and type(built.size) is int  # pylint: disable=unidiomatic-typecheck
    task = tfnegcache.CacheRetrieval(cache=built, candidate_model=lambda f: f,
                                     num_negatives=np.int64(2), top_m=np.int64(3))
    assert task.num_negatives == 2 and task.top_m == 3


def test_feature_spec_must_be_a_dict():
    with pytest.raises(ValueError, match=r"`feature_spec` must be a non-empty dict.*Received: "
                                         r"feature_spec=\["):
        cache(feature_spec=[tf.TensorSpec([], tf.int64)])


@pytest.mark.parametrize("name,value,expected", [
    ("num_negatives", 2.5, "an integer >= 1"),
    ("num_negatives", 0, "an integer >= 1"),
    ("top_m", 2.5, "an integer >= 1 or None"),
    ("refresh_per_step", 2.5, "an integer >= 0"),
    ("refresh_per_step", -1, "an integer >= 0"),
    ("temperature", 0, r"a number > 0 \(scores are divided by it\) or None"),
    ("temperature", -0.5, r"a number > 0 \(scores are divided by it\) or None"),
    ("temperature", float("nan"), r"a number > 0 \(scores are divided by it\) or None"),
    ("temperature", True, r"a number > 0 \(scores are divided by it\) or None"),
])
def test_task_numbers_are_checked_at_construction(name, value, expected):
    with pytest.raises(ValueError, match=rf"`{name}` must be {expected}\. Received: {name}="):
        tfnegcache.CacheRetrieval(cache=cache(), candidate_model=lambda f: f, **{name: value})


@pytest.mark.parametrize("name,value", [("every_n_steps", 0), ("every_n_steps", 2.5),
                                        ("batch_size", 0), ("batch_size", "8")])
def test_refresh_callback_numbers_are_checked(name, value):
    with pytest.raises(ValueError, match=rf"`{name}` must be an integer"):
        tfnegcache.CacheRefreshCallback(**{name: value})


def test_an_empty_batch_has_loss_zero_and_leaves_the_cache_alone():
    model = toy.ToyModel(cache_size=64)
    model.compile(tf.keras.optimizers.Adam(0.05))
    data = toy.interactions(128, seed=1)
    model.fit(toy.dataset(data, 64), epochs=1, verbose=0)
    empty = {k: tf.constant(v[:0]) for k, v in data.items()}
    before = {v.name: v.numpy() for v in model.task.cache.weights}
    # Eager, as TFRS: loss 0, and nothing recorded for the cache.
    with tfnegcache.step.recording() as record:
        assert float(model.compute_loss(empty, training=True)) == 0.0
    assert record.updates == []
    # A traced step whose batch size is only known at run time, fed 0 rows.
    spec = {k: tf.TensorSpec([None, *v.shape[1:]], v.dtype) for k, v in empty.items()}
    step = tf.function(model.train_step, input_signature=[spec])
    assert float(step(empty)["loss"]) == 0.0
    for name, value in before.items():
        now = {v.name: v.numpy() for v in model.task.cache.weights}[name]
        np.testing.assert_array_equal(value, now, err_msg=name)


class TowerReturning(toy.ToyModel):
    """The toy model whose cache's candidate_model is replaced by `encoder`."""

    def __init__(self, encoder, **kwargs):
        super().__init__(cache_size=64, **kwargs)
        self.task.candidate_model = lambda f: encoder(self.candidate_tower, f)


@pytest.mark.parametrize("encoder,message", [
    (lambda tower, f: {"embedding": tower(f)},
     r"`candidate_model` must return one tensor of embeddings, \[num_candidates, 16\], for a "
     r"dict of cached features\. Received: dict with keys \['embedding'\]"),
    (lambda tower, f: tower(f)[:-1],
     r"`candidate_model` output has \d+ rows but there are \d+ cached candidates given to it"),
])
def test_a_candidate_model_that_returns_the_wrong_thing_is_named(encoder, message):
    model = TowerReturning(encoder)
    model.compile(tf.keras.optimizers.Adam(0.05))
    model(tf.constant([0], tf.int64))
    model.candidate_tower({k: tf.constant(v[:1]) for k, v in toy.item_table().items()})
    model.optimizer.build(model.trainable_variables)   # as after a first step
    data = toy.interactions(192, seed=1)
    model.task.cache.insert(*(lambda f: (f, model.candidate_tower(f), f["item_id"]))(
        {"item_id": tf.constant(data["item_id"][128:]),
         "tokens": tf.constant(data["tokens"][128:])}))
    before = full_state(model)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match=message):
        model.fit(toy.dataset({k: v[:128] for k, v in data.items()}, 64), epochs=1, verbose=0)
    assert_unchanged(before, model)


def test_scoring_dtype_is_checked_and_kept_in_the_config():
    spec = {"x": tf.TensorSpec([], tf.int64)}
    with pytest.raises(ValueError, match=r"`scoring_dtype` must be None .*Received: "
                                         r"scoring_dtype=tf\.int32"):
        tfnegcache.NegativeCache(8, spec, 4, scoring_dtype=tf.int32)
    cache = tfnegcache.NegativeCache(8, spec, 4, scoring_dtype="bfloat16")
    assert cache.scoring_dtype == tf.bfloat16
    config = cache.get_config()
    assert config["scoring_dtype"] == "bfloat16"
    assert tfnegcache.NegativeCache.from_config(config).scoring_dtype == tf.bfloat16
    assert tfnegcache.NegativeCache(8, spec, 4).get_config()["scoring_dtype"] is None


# ------------------------------------------------------------------ memory


def test_the_memory_estimate_is_the_bytes_the_variables_take():
    # Numeric variables: the estimate is exact (the id index is the measured estimate).
    built = cache(size=50, embedding_dtype=tf.bfloat16)
    parts = built.spec.memory_bytes()
    assert parts["index"] == 50 * tfnegcache.spec.INDEX_ENTRY_BYTES
    assert sum(parts.values()) - parts["index"] == sum(v.numpy().nbytes for v in built.weights)
    assert parts["embeddings"] == 50 * 4 * 2 and parts["features"] == 50 * (8 + 3 * 8)


@pytest.mark.parametrize("cache_type", [tfnegcache.NegativeCache, tfnegcache.ShardedNegativeCache])
def test_a_cache_larger_than_the_machine_is_refused_before_allocating(cache_type):
    # 2^31 slots of the toy spec: 8 + 24 bytes of features, 64 of embeddings, 8 of id, 16 of
    # steps and 48 of index per slot.
    per_slot = 8 + 24 + 64 + 8 + 16 + tfnegcache.spec.INDEX_ENTRY_BYTES
    total = (2**31 * per_slot + 24) / 2**30
    with pytest.raises(ValueError, match=rf"^`size` must be small enough for the cache to fit "
                                         rf"in this machine's memory \(\d+\.\d GiB\): 2147483648 "
                                         rf"slots of this spec need about {total:.1f} GiB "
                                         rf"\(features 64\.0 GiB, embeddings 128\.0 GiB, ids "
                                         rf"16\.0 GiB, bookkeeping 32\.0 GiB, index 96\.0 GiB; "
                                         rf"a string element counted as 32 bytes\)\. Received: "
                                         rf"size=2147483648\.$"):
        cache_type(2**31, toy.FEATURE_SPEC, 16)


def test_the_memory_check_refuses_exactly_what_exceeds_the_memory():
    spec = tfnegcache.spec.CacheSpec.build(
        1000, {"title": tf.TensorSpec([2], tf.string)}, 8, id_dtype=tf.string)
    need = sum(spec.memory_bytes().values())
    assert need == 1000 * (2 * 32 + 8 * 4 + 32 + 16 + 48 + 32) + 24
    spec.check_memory(available=need)            # fits exactly
    with pytest.raises(ValueError, match=r"`size` must be small enough for the cache to fit "
                                         r"in this machine's memory \(218\.8 KiB\): 1000 slots "
                                         r"of this spec need about 218\.8 KiB \(.*\)\. "
                                         r"Received: size=1000\."):
        spec.check_memory(available=need - 1)
