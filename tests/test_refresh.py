"""Refresh policies, warm start, top-m sampling, and logQ with a cache."""

import numpy as np
import pytest
import scipy.special
import scipy.stats
import tensorflow as tf

import tfnegcache
from tfnegcache import CacheUpdate, refresh, sampling
from tfnegcache.cache import refresh_seed
import toy

DIM = 16


def items(ids):
    table = toy.item_table()
    ids = np.asarray(ids, np.int64)
    return {"item_id": tf.constant(ids), "tokens": tf.constant(table["tokens"][ids])}


def filled_cache(size=32, num=20, seed=0):
    cache = tfnegcache.NegativeCache(size, toy.FEATURE_SPEC, DIM, seed=seed)
    feats = items(np.arange(num))
    rng = np.random.default_rng(seed)
    cache.insert(feats, tf.constant(rng.normal(size=(num, DIM)), tf.float32), feats["item_id"])
    return cache


def state(cache):
    return {v.name: v.numpy() for v in cache.weights}


def encoder():
    tf.keras.utils.set_random_seed(3)
    tower = toy.CandidateTower(DIM)
    tower(items([0]))
    return tower


def assert_encoded(cache, tower, slots):
    slots = np.asarray(slots)
    features = {k: tf.gather(v, slots) for k, v in cache.features.items()}
    np.testing.assert_allclose(tf.gather(cache.embeddings, slots).numpy(),
                               tower(features).numpy(), rtol=1e-5, atol=1e-6)


def assert_only_changed(before, after, changed_slots, ignore=()):
    for name, old in before.items():
        if any(name.endswith(f"/{key}:0") for key in ignore):
            continue
        new = after[name]
        if name.endswith("embeddings:0") or name.endswith("updated_at:0"):
            keep = np.setdiff1d(np.arange(len(old)), changed_slots)
            np.testing.assert_array_equal(old[keep], new[keep], err_msg=name)
        else:
            np.testing.assert_array_equal(old, new, err_msg=name)


def test_refresh_writes_exactly_the_given_filled_slots():
    cache, tower = filled_cache(), encoder()
    before = state(cache)
    cache.refresh(tf.constant([3, 7, 25]), tower)   # slot 25 is empty: skipped
    after = state(cache)
    assert_encoded(cache, tower, [3, 7])
    assert_only_changed(before, after, [3, 7])
    np.testing.assert_array_equal(after["negative_cache/embeddings:0"][20:], 0.0)


def test_random_refresh_is_uniform_distinct_stateless_and_writes_only_its_choice():
    cache, tower = filled_cache(), encoder()
    seed = refresh_seed(cache.seed, 0)
    chosen = cache.random_filled_slots(6, seed).numpy()
    assert len(set(chosen)) == 6 and chosen.max() < 20
    np.testing.assert_array_equal(chosen, cache.random_filled_slots(6, seed).numpy())
    other = cache.random_filled_slots(6, refresh_seed(cache.seed, 1)).numpy()
    assert set(other) != set(chosen)
    # More than filled: every filled slot once.
    assert sorted(cache.random_filled_slots(31, refresh_seed(cache.seed, 0)).numpy()) == list(range(20))
    # Uniform over filled slots: counts over many steps.
    counts = np.zeros(32)
    for step in range(300):
        counts[cache.random_filled_slots(
            2, refresh_seed(0, step)).numpy()] += 1
    assert counts[20:].sum() == 0
    assert scipy.stats.chisquare(counts[:20]).pvalue > 1e-3

    # A training step's refresh: the slots of the step's seed, encoded, then written.
    before = state(cache)
    slots, features = cache.refresh_candidates(6)
    np.testing.assert_array_equal(slots.numpy(), chosen)
    cache.update(CacheUpdate(refresh_slots=slots, refresh_embeddings=tower(features)))
    assert int(cache.step.numpy()) == 1
    assert_encoded(cache, tower, chosen)
    assert_only_changed(before, state(cache), chosen, ignore=("step",))


def test_refresh_per_step_encodes_with_the_weights_before_the_optimizer_step():
    model = toy.ToyModel(cache_size=toy.NUM_ITEMS, refresh_per_step=40, write_back=False)
    cache = model.task.cache
    cache.warm_start(tf.data.Dataset.from_tensor_slices(toy.item_table()),
                     model.candidate_tower, id_key="item_id")
    model.compile(tf.keras.optimizers.Adam(0.05))
    data = toy.interactions(64, seed=5)
    before = state(cache)
    chosen = cache.random_filled_slots(40, refresh_seed(cache.seed, 0)).numpy()
    features = {k: tf.gather(v, chosen) for k, v in cache.features.items()}
    pre_step = model.candidate_tower(features).numpy()
    model.fit(toy.dataset(data, 64), epochs=1, verbose=0)   # one step
    batch_slots = cache.lookup(tf.constant(data["item_id"])).numpy()
    refreshed = np.setdiff1d(chosen, batch_slots)
    assert len(refreshed) > 20
    rows = np.searchsorted(chosen, refreshed, sorter=np.argsort(chosen))
    rows = np.argsort(chosen)[rows]
    np.testing.assert_allclose(cache.embeddings.numpy()[refreshed], pre_step[rows],
                               rtol=1e-5, atol=1e-6)
    post_step = model.candidate_tower(features).numpy()[rows]
    assert np.abs(post_step - pre_step[rows]).max() > 1e-3   # the step did move the tower
    untouched = np.setdiff1d(np.arange(toy.NUM_ITEMS), np.concatenate([chosen, batch_slots]))
    np.testing.assert_array_equal(before["negative_cache/embeddings:0"][untouched],
                                  cache.embeddings.numpy()[untouched])


def test_warm_start_fills_in_dataset_order_with_dedupe_and_fifo():
    tower = encoder()
    cache = tfnegcache.NegativeCache(16, toy.FEATURE_SPEC, DIM)
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 4, 10]
    rows = cache.warm_start(tf.data.Dataset.from_tensor_slices(items(ids)), tower,
                            id_key="item_id", batch_size=4)
    assert rows == len(ids)
    assert int(cache.num_filled.numpy()) == 11 and int(cache.step.numpy()) == 0
    np.testing.assert_array_equal(cache.ids.numpy()[:11], np.arange(11))
    assert_encoded(cache, tower, np.arange(11))
    # Larger than the cache: FIFO keeps the last `size` distinct candidates.
    small = tfnegcache.NegativeCache(8, toy.FEATURE_SPEC, DIM)
    tfnegcache.warm_start(small, tf.data.Dataset.from_tensor_slices(items(np.arange(12))),
                          tower, id_key="item_id", batch_size=5)
    assert sorted(small.ids.numpy()) == list(range(4, 12))
    np.testing.assert_array_equal(small.lookup(tf.constant([0, 4, 11], tf.int64)).numpy()[0], -1)


@pytest.mark.parametrize("chunk_size", [7, 16, 50])
def test_top_m_scores_match_a_full_sort(chunk_size):
    rng = np.random.default_rng(0)
    queries = tf.constant(rng.normal(size=(5, 4)), tf.float32)
    embeddings = tf.constant(rng.normal(size=(50, 4)), tf.float32)
    bias = np.zeros(50, np.float32)
    bias[[1, 2, 40]] = -np.inf
    excluded = tf.constant([0, 5, -1, 49, 3], tf.int32)
    values, slots = sampling.top_m_scores(queries, embeddings, tf.constant(bias), excluded,
                                          0.5, 6, chunk_size=chunk_size)
    full = queries.numpy() @ embeddings.numpy().T * 0.5 + bias
    full[np.arange(5), np.maximum(excluded.numpy(), 0)] = np.where(
        excluded.numpy() >= 0, -np.inf, full[np.arange(5), np.maximum(excluded.numpy(), 0)])
    expected = np.sort(full, axis=1)[:, ::-1][:, :6]
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(full, slots.numpy(), 1), expected, rtol=1e-5)


def test_top_m_draws_stay_in_the_top_m_and_follow_the_restricted_softmax():
    rng = np.random.default_rng(1)
    queries = tf.constant(rng.normal(size=(1, 4)), tf.float32)
    embeddings = tf.constant(rng.normal(size=(64, 4)), tf.float32)
    m, n = 8, 20000
    draw = sampling.sample_cache_top_m(queries, embeddings, tf.zeros([64]), 1.0, n,
                                       tf.constant([7, 11], tf.int64), m, chunk_size=16)
    scores = (queries.numpy() @ embeddings.numpy().T)[0]
    top = np.argsort(-scores)[:m]
    slots = draw.slots.numpy()[0]
    assert set(slots) <= set(top)
    np.testing.assert_allclose(draw.log_mass.numpy()[0],
                               np.log(np.exp(scores[top]).sum()), rtol=1e-5)
    probs = np.exp(scores[top].astype(np.float64) - scores[top].max())
    probs /= probs.sum()
    counts = np.array([(slots == s).sum() for s in top])
    assert scipy.stats.chisquare(counts, probs * n).pvalue > 1e-3


def test_top_m_task_trains_and_its_training_logit_is_pinned():
    model = toy.ToyModel(cache_size=256, top_m=10, refresh_per_step=4)
    model.compile(tf.keras.optimizers.Adam(0.05))
    history = model.fit(toy.dataset(toy.interactions(1024, seed=3), 128), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["cache_fill"][-1] > 0.5
    # The training logit on a stale cache: the top-m (stale) log-mass reweighted by the drawn
    # negatives' fresh-over-stale scores, `M_m + log mean_k exp(s_k - s~_k)`, recomputed
    # here from the slots the draw wrote back.
    cache, tower, k, m = filled_cache(size=64, num=60), encoder(), 3, 5
    recorder = Recorder()
    task = tfnegcache.CacheRetrieval(loss=recorder, cache=cache, candidate_model=tower,
                                     top_m=m, num_negatives=k)
    queries = tf.constant(np.random.default_rng(7).normal(size=(4, DIM)), tf.float32)
    feats = items([100, 101, 102, 5])       # item 5 is cached: masked for every query
    with tfnegcache.step.recording() as step:
        task(queries, tower(feats), candidate_ids=feats["item_id"], candidate_features=feats)
    (_, update, _), = step.updates
    logits = recorder.logits.numpy()[:, -1].astype(np.float64)
    q = queries.numpy().astype(np.float64)
    stale = q @ cache.embeddings.numpy()[:60].astype(np.float64).T
    stale[:, 5] = -np.inf
    fresh = q @ tower(items(np.arange(60))).numpy().astype(np.float64).T
    slots = update.write_back_slots.numpy().reshape(4, k)
    for i in range(4):
        top = np.sort(stale[i])[-m:]
        assert set(slots[i]) <= set(np.argsort(stale[i])[-m:])   # draws stay in the top m
        expected = scipy.special.logsumexp(top) + scipy.special.logsumexp(
            fresh[i, slots[i]] - stale[i, slots[i]]) - np.log(k)
        np.testing.assert_allclose(logits[i], expected, rtol=1e-5)


class Recorder(tf.keras.losses.Loss):
    """Softmax cross entropy that keeps the last logits it saw."""

    def __init__(self):
        super().__init__(reduction=tf.keras.losses.Reduction.SUM)
        self.logits = None

    def call(self, y_true, y_pred):
        self.logits = y_pred
        return tf.nn.softmax_cross_entropy_with_logits(y_true, y_pred)


def test_logq_masks_cached_in_batch_columns_and_weights_the_cache():
    """logQ with a cache: in-batch columns get TFRS's `- log Q`, off-diagonal columns of cached
    candidates are masked, and the cache's logit is its unmasked log-mass + log(n - 1)."""
    cache, tower = filled_cache(size=64, num=60), encoder()
    recorder = Recorder()
    task = tfnegcache.CacheRetrieval(loss=recorder, cache=cache, candidate_model=tower)
    rng = np.random.default_rng(2)
    queries = tf.constant(rng.normal(size=(8, DIM)), tf.float32)
    ids = np.array([100, 3, 101, 7, 102, 103, 104, 105])      # 3 and 7 are cached
    feats = items(ids)
    candidates = tower(feats)
    prob = tf.constant(rng.uniform(0.01, 0.5, size=8), tf.float32)
    results = []
    for logq in (None, prob):
        task(queries, candidates, candidate_sampling_probability=logq,
             candidate_ids=feats["item_id"], candidate_features=feats, training=False)
        results.append(recorder.logits.numpy())
    plain, corrected = results
    covered = np.isin(ids, [3, 7])
    keep = np.eye(8, dtype=bool) | ~covered[None, :]
    expected = np.where(keep, plain[:, :-1] - np.log(prob.numpy())[None], corrected[:, :-1])
    np.testing.assert_allclose(corrected[:, :-1], expected, rtol=1e-5, atol=1e-5)
    assert np.all(corrected[:, :-1][~keep] == tfnegcache.retrieval.MIN_FLOAT)
    q, stale = queries.numpy(), cache.embeddings.numpy()[:60]
    cached_ids = cache.ids.numpy()[:60]
    for i in range(8):
        # Without logQ the cache drops every in-batch id; with it, only row i's positive.
        plain_mass = scipy.special.logsumexp((q[i] @ stale.T)[~np.isin(cached_ids, ids)])
        logq_mass = scipy.special.logsumexp((q[i] @ stale.T)[cached_ids != ids[i]])
        np.testing.assert_allclose(plain[i, -1], plain_mass, rtol=1e-5)
        np.testing.assert_allclose(corrected[i, -1], logq_mass + np.log(7), rtol=1e-5)


def test_callback_reencodes_every_filled_slot_and_leaves_empty_ones():
    model = toy.ToyModel(cache_size=512)
    model.compile(tf.keras.optimizers.Adam(0.05))
    callback = tfnegcache.CacheRefreshCallback(every_n_steps=3, at_epoch_end=True,
                                               batch_size=100)
    model.fit(toy.dataset(toy.interactions(2560, seed=4), 128), epochs=1, verbose=0,
              callbacks=[callback])
    cache = model.task.cache
    filled = int(cache.num_filled.numpy())
    assert 0 < filled < 512
    assert callback.refreshes == 20 // 3 + 1
    assert_encoded(cache, model.candidate_tower, np.arange(filled))
    np.testing.assert_array_equal(cache.embeddings.numpy()[filled:], 0.0)
    np.testing.assert_array_equal(cache.ids.numpy()[filled:], 0)


def test_top_m_cache_logit_is_the_log_mass_of_the_top_m_only():
    cache, tower = filled_cache(size=64, num=60), encoder()
    rng = np.random.default_rng(6)
    queries = tf.constant(rng.normal(size=(8, DIM)), tf.float32)
    feats = items(np.arange(100, 108))
    columns = {}
    for m in (None, 64, 3):
        recorder = Recorder()
        task = tfnegcache.CacheRetrieval(loss=recorder, cache=cache, candidate_model=tower,
                                         top_m=m)
        task(queries, tower(feats), candidate_ids=feats["item_id"], candidate_features=feats,
             training=False)
        columns[m] = recorder.logits.numpy()[:, -1]
    np.testing.assert_allclose(columns[64], columns[None], rtol=1e-5)
    scores = queries.numpy() @ cache.embeddings.numpy()[:60].T
    top3 = np.sort(scores, axis=1)[:, -3:]
    np.testing.assert_allclose(columns[3], np.log(np.exp(top3).sum(1)), rtol=1e-5)
    assert np.all(columns[3] < columns[None])


def test_update_with_a_non_finite_refresh_changes_nothing():
    cache, tower = filled_cache(), encoder()
    before = state(cache)

    def poisoned(features):
        return tower(features) * np.nan

    new = items([25, 26])
    slots, features = cache.refresh_candidates(4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="refreshed embeddings"):
        cache.update(CacheUpdate(
            new, tower(new), new["item_id"], write_back_slots=tf.constant([0]),
            write_back_embeddings=tf.ones([1, DIM]), write_back_valid=tf.constant([True]),
            refresh_slots=slots, refresh_embeddings=poisoned(features)))
    for name, old in before.items():
        np.testing.assert_array_equal(old, state(cache)[name], err_msg=name)
    np.testing.assert_array_equal(cache.lookup(new["item_id"]).numpy(), [-1, -1])


def test_refresh_never_overwrites_a_slot_the_insert_just_filled():
    cache, tower = filled_cache(size=20, num=20), encoder()
    new = items([25, 26])
    inserted = tf.constant(np.full([2, DIM], 7.0, np.float32))
    slots, features = cache.refresh_candidates(20)
    cache.update(CacheUpdate(new, inserted, new["item_id"], refresh_slots=slots,
                             refresh_embeddings=tower(features)))
    np.testing.assert_array_equal(cache.ids.numpy()[:2], [25, 26])
    np.testing.assert_array_equal(cache.embeddings.numpy()[:2], inserted.numpy())
    assert_encoded(cache, tower, np.arange(2, 20))


class RefreshSteps(tfnegcache.CacheRefreshCallback):
    """Records the optimizer's step count at each refresh."""

    def __init__(self, **kwargs):
        super().__init__(at_epoch_end=False, batch_size=64, **kwargs)
        self.at_steps = []

    def refresh(self):
        self.at_steps.append(int(self.model.optimizer.iterations.numpy()))
        super().refresh()


def refresh_points(batch_ends, every_n_steps):
    """The batch ends (step counts) at or after which each multiple of K was crossed."""
    points, last = [], 0
    for end in batch_ends:
        if end // every_n_steps > last // every_n_steps:
            points.append(end)
        last = end
    return points


@pytest.mark.parametrize("every_n_steps, steps_per_execution, refreshes", [
    (3, 1, 13), (3, 3, 13), (4, 3, 10), (3, 7, 6), (2, 5, 8), (5, 5, 8)])
def test_callback_counts_steps_under_steps_per_execution(every_n_steps, steps_per_execution,
                                                         refreshes):
    # 20 steps per epoch, 2 epochs. Keras reports one batch end per execution of
    # `steps_per_execution` steps (the last one of an epoch shorter): at these step counts.
    model = toy.ToyModel(cache_size=64)
    model.compile(tf.keras.optimizers.Adam(0.05), steps_per_execution=steps_per_execution)
    callback = RefreshSteps(every_n_steps=every_n_steps)
    model.fit(toy.dataset(toy.interactions(16 * 20, seed=4), 16), epochs=2, verbose=0,
              callbacks=[callback])
    assert int(model.optimizer.iterations.numpy()) == 40
    epoch = [min(s, 20) for s in range(steps_per_execution, 20 + steps_per_execution,
                                       steps_per_execution)]
    expected = refresh_points(epoch + [20 + s for s in epoch], every_n_steps)
    assert callback.refreshes == len(expected) == refreshes
    assert callback.at_steps == expected
    if expected[-1] == 40:   # refreshed after the last step: every slot is the tower's now
        cache = model.task.cache
        assert_encoded(cache, model.candidate_tower, np.arange(int(cache.num_filled.numpy())))


def test_the_refresh_schedule_goes_on_across_fit_calls():
    # Every 3rd optimizer step: two fits of one epoch refresh as one fit of two epochs.
    model = toy.ToyModel(cache_size=64)
    model.compile(tf.keras.optimizers.Adam(0.05), steps_per_execution=3)
    callback = RefreshSteps(every_n_steps=3)
    data = toy.dataset(toy.interactions(16 * 20, seed=4), 16)
    for _ in range(2):
        model.fit(data, epochs=1, verbose=0, callbacks=[callback])
    epoch = [3, 6, 9, 12, 15, 18, 20]
    assert callback.at_steps == refresh_points(epoch + [20 + s for s in epoch], 3)
    assert callback.at_steps[-1] == 40 and callback.refreshes == 13


# ------------------------------------------------------------------ partial warm starts and refreshes


class NanFor(toy.CandidateTower):
    """The toy tower with NaN embeddings for the items in `poisoned`."""

    poisoned = ()

    def call(self, features):
        out = super().call(features)
        bad = tf.reduce_any(tf.equal(features["item_id"][:, None],
                                     tf.constant(self.poisoned, tf.int64)[None, :]), axis=1)
        return tf.where(bad[:, None], np.nan, out)


def index_of(cache):
    keys, slots = (t.numpy() for t in cache.index.export())
    order = np.argsort(keys)
    return keys[order], slots[order]


def test_warm_start_stopped_by_a_bad_row_keeps_exactly_the_batches_before_it():
    tower = encoder()
    tower.__class__ = NanFor
    tower.poisoned = (21,)                      # in the third batch of 8
    cache = tfnegcache.NegativeCache(64, toy.FEATURE_SPEC, DIM)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)^warm_start inserted the first 16 rows of the dataset and stopped "
                             r"at the batch of rows from 16 on: .*`embeddings to insert` has "
                             r"NaN or Inf"):
        cache.warm_start(tf.data.Dataset.from_tensor_slices(items(np.arange(40))), tower,
                         id_key="item_id", batch_size=8)
    # The same cache as a warm start with those 16 rows alone: every variable and the index.
    reference = tfnegcache.NegativeCache(64, toy.FEATURE_SPEC, DIM)
    reference.warm_start(tf.data.Dataset.from_tensor_slices(items(np.arange(16))), tower,
                         id_key="item_id", batch_size=8)
    for (name, got), expected in zip(state(cache).items(), state(reference).values()):
        np.testing.assert_array_equal(got, expected, err_msg=name)
    for got, expected in zip(index_of(cache), index_of(reference)):
        np.testing.assert_array_equal(got, expected)
    assert int(cache.num_filled.numpy()) == 16
    assert_encoded(cache, tower, np.arange(16))
    np.testing.assert_array_equal(cache.embeddings.numpy()[16:], 0.0)


def test_refresh_all_stopped_in_its_second_chunk_leaves_each_row_old_or_fresh():
    cache, tower = filled_cache(size=32, num=20), encoder()
    tower.__class__ = NanFor
    tower.poisoned = (10,)                      # slot 10: the second chunk of 8
    cache.update(CacheUpdate(), advance_step=True)   # step 1: refreshed rows are stamped 1
    before, index = state(cache), index_of(cache)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)^refresh_all re-encoded slots \[0, 8\) of 'negative_cache' and "
                             r"stopped at the chunk of slots \[8, 16\): .*`write-back "
                             r"embeddings` has NaN or Inf"):
        cache.refresh_all(tower, batch_size=8)
    after = state(cache)
    assert_encoded(cache, tower, np.arange(8))                      # fresh
    assert_only_changed(before, after, np.arange(8))                # everything else: old
    np.testing.assert_array_equal(after["negative_cache/updated_at:0"][:8], 1)
    assert not np.allclose(before["negative_cache/embeddings:0"][:8],
                           after["negative_cache/embeddings:0"][:8])
    for got, expected in zip(index_of(cache), index):
        np.testing.assert_array_equal(got, expected)
