"""A training step is one transaction: a step that fails changes nothing.

Each test makes one step fail (or, where the documented behaviour is to go on, succeed) the
way a user would, through `fit`, and compares every weight, optimizer slot, cache variable
and the id index with their values before that step, bit for bit.
"""

import numpy as np
import pytest
import tensorflow as tf

import tfnegcache
import toy

BATCH = 64


def full_state(model):
    """Every weight, optimizer variable and the cache's id index, as numpy arrays."""
    state = {f"{i}:{v.name}": v.numpy() for i, v in enumerate(model.weights)}
    for i, v in enumerate(model.optimizer.variables()):
        state[f"optimizer/{i}:{v.name}"] = v.numpy()
    for i, cache in enumerate(c for task in model.cache_tasks()
                              for c in task.cache.stores()):
        keys, values = (t.numpy() for t in cache.index.export())
        order = np.argsort(keys)
        state[f"index{i}/keys"], state[f"index{i}/slots"] = keys[order], values[order]
    return state


def assert_unchanged(before, model):
    after = full_state(model)
    assert before.keys() == after.keys()
    for name, value in before.items():
        np.testing.assert_array_equal(value, after[name], err_msg=name)


def unbatched(data, batch=BATCH):
    """`.batch(n)` without `drop_remainder`: the batch dimension is unknown when traced."""
    return tf.data.Dataset.from_tensor_slices(data).batch(batch)


def trained(model_cls=toy.ToyModel, steps=3, run_eagerly=False, optimizer=None, **kwargs):
    """A model after a few clean steps (optimizer slots exist, the cache is filled)."""
    model = model_cls(cache_size=kwargs.pop("cache_size", 128), **kwargs)
    model.compile(optimizer or tf.keras.optimizers.Adam(0.05), run_eagerly=run_eagerly)
    clean = toy.interactions(BATCH * steps, seed=1)
    clean = {k: v[clean["item_id"] != POISON] for k, v in clean.items()}
    model.fit(unbatched(clean), epochs=1, verbose=0)
    return model


POISON = toy.NUM_ITEMS - 1   # an item the poisoned towers turn into NaN


class PoisonedTower(toy.CandidateTower):
    def call(self, features):
        out = super().call(features)
        return tf.where(tf.equal(features["item_id"], POISON)[:, None], np.nan, out)


def batch_without_poison(seed=7, size=BATCH):
    data = toy.interactions(size * 3, seed=seed)
    return {k: v[data["item_id"] != POISON][:size] for k, v in data.items()}


def poison_candidate_tower(model):
    model.candidate_tower.__class__ = PoisonedTower
    model.train_function = None   # retrace with the poisoned tower


# ------------------------------------------------------------------ non-finite values


def test_a_non_finite_refreshed_embedding_fails_before_the_optimizer_step():
    model = trained(refresh_per_step=1000)   # every filled slot is refreshed each step
    cache = model.task.cache
    # The poisoned candidate sits in the cache, scored so low that it is never drawn:
    # only the refresh re-encodes it.
    model.query_tower.embeddings.assign(tf.abs(model.query_tower.embeddings) + 0.1)
    table = toy.item_table()
    cache.insert({k: tf.constant(v[POISON:]) for k, v in table.items()},
                 tf.fill([1, 16], -100.0), tf.constant([POISON], tf.int64))
    poison_candidate_tower(model)
    before = full_state(model)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"`refreshed embeddings` has NaN or Inf"):
        model.fit(unbatched(batch_without_poison()), epochs=1, verbose=0)
    assert_unchanged(before, model)


def test_nan_query_embeddings_fail_the_step_on_the_loss():
    model = trained()

    class PoisonedQueries(tf.keras.layers.Embedding):
        def call(self, ids):
            out = super().call(ids)
            return tf.where(tf.equal(ids, 0)[:, None], np.nan, out)

    model.query_tower.__class__ = PoisonedQueries
    model.train_function = None
    batch = batch_without_poison()
    batch["user_id"][5] = 0
    before = full_state(model)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"the loss has NaN or Inf"):
        model.fit(unbatched(batch), epochs=1, verbose=0)
    assert_unchanged(before, model)


class WeightedToy(toy.ToyModel):
    def compute_loss(self, features, training=False):
        candidates = {"item_id": features["item_id"], "tokens": features["tokens"]}
        return self.task(
            self.query_tower(features["user_id"]), self.candidate_tower(candidates),
            sample_weight=features["weight"], candidate_ids=features["item_id"],
            candidate_features=candidates, compute_metrics=False)


def test_a_nan_sample_weight_fails_the_step():
    model = WeightedToy(cache_size=128)
    model.compile(tf.keras.optimizers.Adam(0.05))
    clean = batch_without_poison(seed=1)
    clean["weight"] = np.ones(BATCH, np.float32)
    model.fit(unbatched(clean), epochs=1, verbose=0)
    poisoned = dict(batch_without_poison(), weight=np.ones(BATCH, np.float32))
    poisoned["weight"][9] = np.nan
    before = full_state(model)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"the loss has NaN or Inf"):
        model.fit(unbatched(poisoned), epochs=1, verbose=0)
    assert_unchanged(before, model)


def test_nan_reencoded_negatives_without_write_back_fail_the_step():
    # The cache holds the batch's candidates (masked: in-batch negatives) and the poisoned
    # item, so every draw re-encodes the poisoned item.
    model = trained(write_back=False, cache_size=BATCH + 1)
    table = toy.item_table()
    batch = batch_without_poison()
    cache = model.task.cache
    cache.insert({k: tf.constant(v[POISON:]) for k, v in table.items()},
                 tf.zeros([1, 16]), tf.constant([POISON], tf.int64))
    poison_candidate_tower(model)
    before = full_state(model)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"the loss has NaN or Inf"):
        model.fit(unbatched(batch), epochs=1, verbose=0)
    assert_unchanged(before, model)


def test_a_nan_gradient_with_a_finite_loss_names_the_variable():
    class RootTower(tf.keras.layers.Embedding):
        """sqrt(x^2): finite output everywhere, NaN gradient where an entry is 0."""

        def call(self, ids):
            return tf.sqrt(tf.square(super().call(ids)))

    model = trained()
    model.query_tower.__class__ = RootTower
    model.train_function = None
    batch = batch_without_poison()
    weights = model.query_tower.embeddings.numpy()
    weights[batch["user_id"][0], 3] = 0.0
    model.query_tower.embeddings.assign(weights)
    before = full_state(model)
    name = model.query_tower.embeddings.name
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"the gradient of `{name}` has NaN or Inf"):
        model.fit(unbatched(batch), epochs=1, verbose=0)
    assert_unchanged(before, model)


class StepWeights(tf.keras.callbacks.Callback):
    """The model's full state at the start of each training step."""

    def on_train_batch_begin(self, batch, logs=None):
        self.state = full_state(self.model)


def test_overflowing_scores_stop_training_with_the_last_good_weights():
    model = toy.ToyModel(cache_size=128)
    model.compile(tf.keras.optimizers.SGD(1e6))
    recorder = StepWeights()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"has NaN or Inf"):
        model.fit(unbatched(toy.interactions(BATCH * 40, seed=3)), epochs=1, verbose=0,
                  callbacks=[recorder])
    assert_unchanged(recorder.state, model)
    for v in model.weights:
        if v.dtype.is_floating:
            assert np.all(np.isfinite(v.numpy())), v.name


# ------------------------------------------------------------------ rows that do not match


class MisalignedToy(toy.ToyModel):
    """Passes the task `tokens` with `extra_rows` rows more (or fewer) than the ids."""

    extra_rows = 0
    extra_ids = 0

    def compute_loss(self, features, training=False):
        candidates = {"item_id": features["item_id"], "tokens": features["tokens"]}
        tokens = features["tokens"]
        if self.extra_rows < 0:
            tokens = tokens[:self.extra_rows]
        elif self.extra_rows > 0:
            tokens = tf.concat([tokens, tokens[:self.extra_rows]], 0)
        ids = features["item_id"]
        if self.extra_ids:
            ids = tf.concat([ids, ids[:self.extra_ids]], 0)
        return self.task(
            self.query_tower(features["user_id"]), self.candidate_tower(candidates),
            candidate_ids=ids, candidate_features={"item_id": features["item_id"],
                                                   "tokens": tokens},
            compute_metrics=False)


@pytest.mark.parametrize("extra_rows", [-1, 1])
def test_features_with_a_row_too_few_or_too_many_fail_with_unknown_batch_size(extra_rows):
    model = trained(MisalignedToy)
    model.extra_rows = extra_rows
    model.train_function = None
    before = full_state(model)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"feature `tokens` of `candidate_features` has {BATCH + extra_rows} "
                             rf"rows but there are {BATCH} candidates"):
        model.fit(unbatched(batch_without_poison()), epochs=1, verbose=0)
    assert_unchanged(before, model)


def test_ids_and_embeddings_row_mismatch_fails_before_the_optimizer_in_eager_mode():
    model = trained(MisalignedToy, run_eagerly=True, steps=1)
    model.extra_ids = 1
    before = full_state(model)
    with pytest.raises(ValueError, match=rf"`candidate_ids` has {BATCH + 1} rows but there "
                                         rf"are {BATCH} candidate embeddings"):
        model.fit(unbatched(batch_without_poison()), epochs=1, verbose=0)
    assert_unchanged(before, model)


def test_ids_and_embeddings_row_mismatch_fails_with_unknown_batch_size():
    model = trained(MisalignedToy)
    model.extra_ids = 1
    model.train_function = None
    before = full_state(model)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"`candidate_ids` has {BATCH + 1} rows but there are {BATCH} "
                             "candidate embeddings"):
        model.fit(unbatched(batch_without_poison()), epochs=1, verbose=0)
    assert_unchanged(before, model)


# ------------------------------------------------------------------ batches and the FIFO


def test_a_batch_with_more_rows_than_slots_trains_when_its_distinct_ids_fit():
    # As in the TFRS tutorial (batch 8192, 1,664 titles): here 512 rows, at most 300 ids.
    model = toy.ToyModel(cache_size=toy.NUM_ITEMS)
    model.compile(tf.keras.optimizers.Adam(0.05))
    data = toy.interactions(512 * 3, seed=2)
    history = model.fit(unbatched(data, 512), epochs=1, verbose=0)
    cache = model.task.cache
    assert history.history["cache_fill"][-1] == pytest.approx(
        len(np.unique(data["item_id"])) / toy.NUM_ITEMS)
    filled = int(cache.num_filled.numpy())
    np.testing.assert_array_equal(cache.lookup(tf.constant(cache.ids.numpy()[:filled])).numpy(),
                                  np.arange(filled))


def test_more_distinct_ids_than_slots_keep_the_latest_and_train():
    model = toy.ToyModel(cache_size=32)
    model.compile(tf.keras.optimizers.Adam(0.05))
    data = toy.interactions(256, seed=2)
    model.fit(unbatched(data, 256), epochs=1, verbose=0)
    cache = model.task.cache
    ids = data["item_id"]
    last_seen = {item: row for row, item in enumerate(ids)}
    latest = sorted(last_seen, key=last_seen.get)[-32:]
    assert sorted(cache.ids.numpy()) == sorted(latest)
