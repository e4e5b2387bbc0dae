"""NegativeCache: FIFO insert with id dedupe, write-back, ages, validation, checkpoints."""

import numpy as np
import pytest
import tensorflow as tf

import tfnegcache
from tfnegcache import CacheUpdate

SPEC = {"item_id": tf.TensorSpec([], tf.int64), "tokens": tf.TensorSpec([2], tf.int64),
        "title": tf.TensorSpec([], tf.string)}


def make_cache(size=4, dim=3, **kwargs):
    return tfnegcache.NegativeCache(size, SPEC, dim, **kwargs)


def rows(ids, value=None, dim=3):
    """Features, embeddings and ids for `ids`; embeddings default to the id in every column."""
    ids = np.asarray(ids, np.int64)
    value = ids if value is None else np.asarray(value)
    features = {"item_id": tf.constant(ids * 10), "tokens": tf.constant(np.stack([ids, -ids], 1)),
                "title": tf.constant([f"t{i}" for i in ids])}
    embeddings = tf.constant(np.repeat(value[:, None], dim, 1).astype(np.float32))
    return features, embeddings, tf.constant(ids)


def snapshot(cache):
    return {v.name: v.numpy() for v in cache.weights}


def assert_same(before, after):
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def assert_index_consistent(cache):
    filled = int(cache.num_filled.numpy())
    ids = cache.ids.numpy()[:filled]
    np.testing.assert_array_equal(cache.lookup(tf.constant(ids)).numpy(), np.arange(filled))


def test_variables_are_named_under_the_layer():
    names = [v.name for v in make_cache().weights]
    assert "negative_cache/embeddings:0" in names
    assert "negative_cache/features/tokens:0" in names


def test_fifo_insert_evicts_oldest_and_stamps_ages():
    cache = make_cache()
    cache.update(CacheUpdate(*rows([1, 2, 3])))           # step 0 -> 1
    cache.update(CacheUpdate(*rows([4, 5])))              # step 1 -> 2: 5 evicts 1 from slot 0
    np.testing.assert_array_equal(cache.ids.numpy(), [5, 2, 3, 4])
    np.testing.assert_array_equal(cache.inserted_at.numpy(), [1, 0, 0, 1])
    np.testing.assert_array_equal(cache.embeddings.numpy()[:, 0], [5, 2, 3, 4])
    np.testing.assert_array_equal(cache.features["item_id"].numpy(), [50, 20, 30, 40])
    np.testing.assert_array_equal(cache.features["title"].numpy(), [b"t5", b"t2", b"t3", b"t4"])
    assert int(cache.num_filled.numpy()) == 4 and int(cache.cursor.numpy()) == 1
    assert int(cache.step.numpy()) == 2
    np.testing.assert_array_equal(cache.lookup(tf.constant([1, 5, 2, 9])).numpy(), [-1, 0, 1, -1])
    cache.update(CacheUpdate(*rows([6, 7])))              # evicts 2 and 3, the next oldest
    np.testing.assert_array_equal(cache.ids.numpy(), [5, 6, 7, 4])
    assert_index_consistent(cache)


def test_cached_id_refreshes_its_slot_instead_of_taking_another():
    cache = make_cache(size=5)
    cache.update(CacheUpdate(*rows([1, 2, 3])))
    cache.update(CacheUpdate(*rows([2, 8], value=[20.0, 8.0])))
    np.testing.assert_array_equal(cache.ids.numpy(), [1, 2, 3, 8, 0])
    np.testing.assert_array_equal(cache.embeddings.numpy()[:, 0], [1, 20, 3, 8, 0])
    np.testing.assert_array_equal(cache.inserted_at.numpy(), [0, 1, 0, 1, 0])
    assert int(cache.num_filled.numpy()) == 4


def test_repeated_id_within_a_batch_keeps_the_last_row():
    cache = make_cache()
    cache.insert(*rows([7, 9, 7], value=[1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(cache.ids.numpy()[:2], [7, 9])
    np.testing.assert_array_equal(cache.embeddings.numpy()[:2, 0], [3, 2])
    assert int(cache.num_filled.numpy()) == 2


def test_a_candidate_inserted_by_a_call_is_still_cached_after_it():
    # Full cache [a, b, c] with a oldest; inserting [e, a] refreshes a in place, and e
    # takes the oldest slot not holding a candidate of this call (b's), not a's.
    cache = make_cache(size=3)
    cache.insert(*rows([1, 2, 3]))
    cache.insert(*rows([5, 1], value=[50.0, 10.0]))
    np.testing.assert_array_equal(cache.ids.numpy(), [1, 5, 3])
    np.testing.assert_array_equal(cache.embeddings.numpy()[:, 0], [10, 50, 3])
    np.testing.assert_array_equal(cache.lookup(tf.constant([1, 5, 2])).numpy(), [0, 1, -1])
    assert int(cache.cursor.numpy()) == 2
    # The next new id evicts the oldest remaining slot (3), then the ring goes on.
    cache.insert(*rows([6, 7]))
    np.testing.assert_array_equal(cache.ids.numpy(), [7, 5, 6])
    assert_index_consistent(cache)


def test_a_batch_larger_than_the_cache_fits_when_its_distinct_ids_do():
    cache = make_cache(size=3)
    cache.insert(*rows([4, 5, 4, 5, 6, 6, 4], value=[1, 2, 3, 4, 5, 6, 7]))
    np.testing.assert_array_equal(cache.ids.numpy(), [4, 5, 6])
    np.testing.assert_array_equal(cache.embeddings.numpy()[:, 0], [7, 4, 6])  # last rows
    assert int(cache.num_filled.numpy()) == 3
    assert_index_consistent(cache)


def test_more_distinct_ids_than_slots_keeps_the_ones_seen_last():
    # 5 distinct ids for 3 slots: the 3 whose last rows come latest (1 at row 3, 4, 5) stay,
    # each with its last row; the cache's older candidate 9 and ids 2, 3 do not.
    cache = make_cache(size=3)
    cache.insert(*rows([9]))
    cache.insert(*rows([1, 2, 3, 1, 4, 5], value=[1, 2, 3, 10, 4, 5]))
    assert sorted(cache.ids.numpy()) == [1, 4, 5]
    np.testing.assert_array_equal(cache.lookup(tf.constant([9, 2, 3])).numpy(), [-1] * 3)
    emb = dict(zip(cache.ids.numpy(), cache.embeddings.numpy()[:, 0]))
    assert emb == {1: 10, 4: 4, 5: 5}
    assert_index_consistent(cache)


def test_write_embeddings_touches_only_filled_chosen_slots():
    cache = make_cache(size=4)
    cache.update(CacheUpdate(*rows([1, 2])))
    before = snapshot(cache)
    cache.write_embeddings(tf.constant([1, 3, 0]), tf.constant(np.full([3, 3], 9.0, np.float32)),
                           valid=tf.constant([True, True, False]))
    after = snapshot(cache)
    emb = after["negative_cache/embeddings:0"]
    np.testing.assert_array_equal(emb[:, 0], [1, 9, 0, 0])   # slot 3 empty, slot 0 not valid
    np.testing.assert_array_equal(after["negative_cache/updated_at:0"], [0, 1, 0, 0])
    for name in before:
        if "embeddings" not in name and "updated_at" not in name:
            np.testing.assert_array_equal(before[name], after[name])


def test_sample_never_draws_masked_excluded_or_empty_slots():
    cache = make_cache(size=8, dim=2)
    cache.insert(*rows([1, 2, 3, 4, 5], value=np.zeros(5), dim=2))
    queries = tf.zeros([2, 2])       # all scores equal: uniform over eligible slots
    draw = cache.sample(queries, num_samples=4000, masked_ids=tf.constant([2, 99]),
                        excluded_ids=tf.constant([4, 1]))
    slots = draw.slots.numpy()
    assert set(np.unique(slots[0])) == {0, 2, 4}      # not 1 (masked id 2), 3 (excluded 4), empty
    assert set(np.unique(slots[1])) == {2, 3, 4}      # not 0 (excluded 1), 1 (masked)
    np.testing.assert_allclose(draw.log_mass.numpy(), np.log([3, 3]), rtol=1e-6)


def test_draws_depend_on_seed_and_step_but_evaluation_does_not_advance_them():
    cache = make_cache(size=8, dim=2, seed=3)
    cache.insert(*rows(np.arange(8), value=np.zeros(8), dim=2))
    first = cache.sample(tf.zeros([4, 2]), num_samples=50).slots.numpy()
    cache.log_mass(tf.zeros([4, 2]))
    again = cache.sample(tf.zeros([4, 2]), num_samples=50).slots.numpy()
    np.testing.assert_array_equal(first, again)
    cache.update()
    assert not np.array_equal(first, cache.sample(tf.zeros([4, 2]), num_samples=50).slots.numpy())


@pytest.mark.parametrize("bad,match", [
    (lambda f: {k: v for k, v in f.items() if k != "tokens"}, r"missing feature\(s\) \['tokens'\]"),
    (lambda f: {**f, "tokens": tf.zeros([2, 3], tf.int64)}, r"shape \(2, 3\).*\[num_candidates, \*\(2,\)\]"),
    (lambda f: {**f, "item_id": tf.zeros([2], tf.int32)}, r"dtype int32, but the cache's feature_spec says int64"),
    (lambda f: {**f, "item_id": tf.zeros([3], tf.int64)}, r"feature `item_id` of `candidate_features` has 3 rows but there are 2 candidates"),
])
def test_bad_features_are_rejected_with_what_was_expected(bad, match):
    cache = make_cache()
    features, embeddings, ids = rows([1, 2])
    before = snapshot(cache)
    with pytest.raises(ValueError, match=match):
        cache.insert(bad(features), embeddings, ids)
    assert_same(before, snapshot(cache))


def test_bad_embeddings_ids_and_sizes_are_rejected():
    cache = make_cache(size=2, dim=3)
    features, embeddings, ids = rows([1, 2])
    with pytest.raises(ValueError, match=r"\[num_rows, 3\].*Received shape \(2, 4\)"):
        cache.insert(features, tf.zeros([2, 4]), ids)
    with pytest.raises(ValueError, match="id_dtype is int64"):
        cache.insert(features, embeddings, tf.constant(["a", "b"]))
    with pytest.raises(ValueError, match=r"dimension 5, but the cache stores embeddings of dimension 3"):
        cache.sample(tf.zeros([2, 5]))
    with pytest.raises(ValueError, match="num_samples"):
        cache.sample(tf.zeros([2, 3]), num_samples=0)
    with pytest.raises(ValueError, match="size"):
        make_cache(size=0)
    with pytest.raises(ValueError, match="fully defined"):
        tfnegcache.NegativeCache(4, {"x": tf.TensorSpec([None], tf.int64)}, 3)


def test_non_finite_embeddings_never_enter_and_leave_cache_intact():
    cache = make_cache()
    cache.update(CacheUpdate(*rows([1, 2])))
    before = snapshot(cache)
    features, embeddings, ids = rows([3, 4])
    poisoned = tf.tensor_scatter_nd_update(embeddings, [[1, 2]], [np.inf])
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite"):
        cache.insert(features, poisoned, ids)
    nan = tf.constant(np.full([1, 3], np.nan, np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite"):
        # A valid insert with a poisoned write-back: neither is applied.
        cache.update(CacheUpdate(features, embeddings, ids, write_back_slots=tf.constant([0]),
                                 write_back_embeddings=nan,
                                 write_back_valid=tf.constant([True])))
    assert_same(before, snapshot(cache))
    assert_index_consistent(cache)


def test_string_ids_work():
    cache = tfnegcache.NegativeCache(3, {"title": tf.TensorSpec([], tf.string)}, 2,
                                     id_dtype=tf.string)
    cache.insert({"title": tf.constant(["a", "b"])}, tf.ones([2, 2]), tf.constant(["x", "y"]))
    cache.insert({"title": tf.constant(["c", "d"])}, tf.ones([2, 2]), tf.constant(["y", "z"]))
    np.testing.assert_array_equal(cache.ids.numpy(), [b"x", b"y", b"z"])
    np.testing.assert_array_equal(cache.lookup(tf.constant(["z", "q"])).numpy(), [2, -1])


def test_checkpoint_round_trip_restores_every_variable_and_the_index(tmp_path):
    cache = make_cache(size=5, embedding_dtype=tf.bfloat16)
    for batch in ([1, 2, 3], [4, 5, 6], [2, 7]):
        cache.update(CacheUpdate(*rows(batch, value=np.array(batch) + 0.25)))
    path = tf.train.Checkpoint(cache=cache).write(str(tmp_path / "ckpt"))
    restored = make_cache(size=5, embedding_dtype=tf.bfloat16)
    tf.train.Checkpoint(cache=restored).read(path).assert_consumed()
    assert_same(snapshot(cache), snapshot(restored))
    assert_index_consistent(restored)
    # Both continue identically.
    for c in (cache, restored):
        c.update(CacheUpdate(*rows([8, 3])))
    assert_same(snapshot(cache), snapshot(restored))
    probe = tf.constant([1, 2, 3, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(cache.lookup(probe).numpy(), restored.lookup(probe).numpy())


def test_updates_work_inside_tf_function():
    cache = make_cache(size=4)

    @tf.function
    def step(features, embeddings, ids):
        cache.update(CacheUpdate(features, embeddings, ids))

    step(*rows([1, 2, 3]))
    step(*rows([3, 4, 5]))
    np.testing.assert_array_equal(cache.ids.numpy(), [5, 2, 3, 4])
    assert_index_consistent(cache)
