"""The Keras 3 cache's state: the FIFO over distinct ids, the sorted id index, the write-back
order, agreement with the TF front end, and every refused write leaving it bit-identical."""

import numpy as np
import pytest

import cases
import k3help
import tfnegcache.keras3 as k3
from tfnegcache.keras3 import fifo, index


def _ids(cache):
    return k3help.numpy(cache.ids.value)[:cache.size]


def _insert(cache, ids, call_index=0):
    ids = np.asarray(ids, np.int32)
    cache.insert({"item_id": ids}, cases.fifo_rows(call_index, ids), ids)


def _insert_calls(cache, calls):
    for i, ids in enumerate(calls):
        _insert(cache, ids, i)


def assert_index_consistent(cache):
    """The index lists every filled slot's id once, ascending, with its slot; then EMPTY."""
    filled = int(k3help.numpy(cache.num_filled.value))
    index_ids = k3help.numpy(cache.index_ids.value)
    index_slots = k3help.numpy(cache.index_slots.value)
    assert np.all(index_ids[filled:] == index.EMPTY) and np.all(index_slots[filled:] == -1)
    assert np.all(np.diff(index_ids[:filled]) > 0)
    np.testing.assert_array_equal(_ids(cache)[index_slots[:filled]], index_ids[:filled])
    assert sorted(index_slots[:filled]) == list(range(filled))


def test_fifo_agrees_with_the_tf_front_end_call_by_call(tf_reference):
    cache = k3help.cache(cases.FIFO_SIZE)
    for i, (ids, expected) in enumerate(zip(cases.FIFO_CALLS, tf_reference["fifo"])):
        _insert(cache, ids, i)
        filled = expected["num_filled"]
        assert int(k3help.numpy(cache.num_filled.value)) == filled
        assert int(k3help.numpy(cache.cursor.value)) == expected["cursor"]
        np.testing.assert_array_equal(_ids(cache)[:filled], expected["ids"][:filled])
        np.testing.assert_array_equal(
            k3help.numpy(cache.embeddings.value)[:filled],
            np.asarray(expected["embeddings"], np.float32)[:filled])
        assert_index_consistent(cache)


def test_fifo_rules_by_hand():
    cache = k3help.cache(4)
    _insert_calls(cache, [[10, 11, 10]])                 # the last row of a repeated id wins
    np.testing.assert_array_equal(_ids(cache)[:2], [10, 11])
    np.testing.assert_array_equal(k3help.numpy(cache.embeddings.value)[0], [2, 2.25, 2.5, 2.75])
    _insert(cache, [12, 11, 13, 14], 1)                 # 11 refreshes slot 1; 14 wraps to 0
    np.testing.assert_array_equal(_ids(cache), [14, 11, 12, 13])
    assert int(k3help.numpy(cache.cursor.value)) == 1
    assert int(k3help.numpy(cache.step.value)) == 0      # inserts do not advance the step
    assert_index_consistent(cache)
    np.testing.assert_array_equal(
        k3help.numpy(cache.lookup(np.array([11, 14, 10, 99], np.int32))), [1, 0, -1, -1])


def test_update_precedence_agrees_with_the_tf_front_end(tf_reference):
    cache = k3help.cache(cases.FIFO_SIZE)
    _insert_calls(cache, cases.FIFO_CALLS)
    insert = np.asarray(cases.UPDATE_INSERT, np.int32)
    wb = np.asarray(cases.UPDATE_WRITE_BACK_SLOTS, np.int32)
    refresh = np.asarray(cases.UPDATE_REFRESH_SLOTS, np.int32)
    cache.update(k3.CacheUpdate(
        insert_features={"item_id": insert}, insert_ids=insert,
        insert_embeddings=cases.update_rows(len(insert), 500.0),
        write_back_slots=wb, write_back_embeddings=cases.write_back_rows(wb),
        write_back_valid=np.asarray(cases.UPDATE_WRITE_BACK_VALID),
        refresh_slots=refresh,
        refresh_embeddings=cases.update_rows(len(refresh), 700.0)), advance_step=True)
    expected = tf_reference["fifo"][-1]
    np.testing.assert_array_equal(_ids(cache), expected["ids"])
    np.testing.assert_array_equal(k3help.numpy(cache.embeddings.value)[:cases.FIFO_SIZE],
                                  np.asarray(expected["embeddings"], np.float32))
    assert int(k3help.numpy(cache.step.value)) == 1
    assert_index_consistent(cache)


def test_random_streams_of_inserts_keep_the_index_exact():
    rng = np.random.default_rng(3)
    cache = k3help.cache(16)
    for call in range(12):
        ids = rng.integers(0, 40, size=8).astype(np.int32)
        cache.insert({"item_id": ids}, np.full([8, 4], call, np.float32), ids)
        assert_index_consistent(cache)
        # Every id of the call is cached, with the call's row.
        slots = k3help.numpy(cache.lookup(ids))
        assert np.all(slots >= 0)
        assert np.all(k3help.numpy(cache.embeddings.value)[slots, 0] == call)


def test_the_spare_row_never_changes():
    cache = k3help.cache(4)
    spare = {v.path: k3help.numpy(v.value)[-1].copy() for v in
             (cache.embeddings, cache.ids, cache.inserted_at, cache.updated_at)}
    _insert_calls(cache, [[1, 2, 3, 1, 2], [4, 5, 6, 7, 8, 9]])
    cache.write_embeddings(np.array([0, 0, 3, 9], np.int32), np.ones([4, 4], np.float32),
                           np.array([True, True, False, True]))
    for v in (cache.embeddings, cache.ids, cache.inserted_at, cache.updated_at):
        np.testing.assert_array_equal(k3help.numpy(v.value)[-1], spare[v.path])


@pytest.mark.parametrize("bad,message", [
    ("nan", "`embeddings to insert` has NaN or Inf"),
    ("dtype", "has dtype float32, but the cache's feature_spec says int32"),
    ("shape", "must have shape [num_rows, 4]"),
    ("rows", "has 3 rows, but there are 2 candidates"),
    ("missing", "is missing feature(s) ['item_id']"),
    ("wide_id", "must be int32 values below 2**31 - 1"),
    ("write_back_nan", "`write-back embeddings` has NaN or Inf"),
])
def test_a_refused_write_raises_and_changes_nothing(bad, message):
    cache = k3help.cache(8)
    _insert_calls(cache, [[1, 2, 3]])
    before = k3help.state(cache)
    ids = np.array([4, 5], np.int32)
    features, rows = {"item_id": ids}, np.ones([2, 4], np.float32)
    call = lambda: cache.insert(features, rows, ids)  # noqa: E731
    if bad == "nan":
        rows[1, 2] = np.nan
    elif bad == "dtype":
        features = {"item_id": ids.astype(np.float32)}
    elif bad == "shape":
        rows = np.ones([2, 3], np.float32)
    elif bad == "rows":
        features = {"item_id": np.array([4, 5, 6], np.int32)}
    elif bad == "missing":
        features = {"title": ids}
    elif bad == "wide_id":
        ids = np.array([4, 2**40], np.int64)
    elif bad == "write_back_nan":
        call = lambda: cache.write_embeddings(  # noqa: E731
            np.array([0, 1], np.int32), np.array([[1, 2, 3, 4], [np.inf, 0, 0, 0]], np.float32))
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)
    k3help.assert_same_state(before, k3help.state(cache))


def test_spec_arguments_are_checked():
    with pytest.raises(ValueError, match=r"`size` must be an integer in \[1, 2147483646\]. "
                                         r"Received: size=0."):
        k3.NegativeCache(0, k3help.SPEC, 4)
    with pytest.raises(ValueError, match="stores numbers only"):
        k3.NegativeCache(4, {"title": ((), "string")}, 4)
    with pytest.raises(ValueError, match=r"`block_size` must be an integer in \[1, size\]"):
        k3.NegativeCache(4, k3help.SPEC, 4, block_size=5)
    spec = k3.NegativeCache(4, {"t": k3.FeatureSpec((3,), "int32")}, 4).feature_spec
    assert spec == {"t": k3.FeatureSpec((3,), "int32")}


def test_group_by_id_and_first_occurrences_on_their_own():
    ids = np.array([5, 2, 5, 9, 2, 5], np.int32)
    group_ids, first, last, valid = (k3help.numpy(x) for x in fifo.group_by_id(ids))
    np.testing.assert_array_equal(valid, [True, True, True, False, False, False])
    np.testing.assert_array_equal(group_ids[:3], [2, 5, 9])
    np.testing.assert_array_equal(first[:3], [1, 0, 3])
    np.testing.assert_array_equal(last[:3], [4, 5, 3])
    keys = np.array([3, 1, 3, 1, 7], np.int32)
    flags = k3help.numpy(fifo.first_occurrences(keys, np.array([False, True, True, True, True])))
    np.testing.assert_array_equal(flags, [False, True, True, False, True])
