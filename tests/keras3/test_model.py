"""`CachedRetrievalModel` on the current backend: `fit` with the caches' metrics in the
history, evaluation that changes nothing, checkpoints, the refresh callback and warm start,
and a failed step: TensorFlow raises, JAX skips it (and the default callback stops `fit`,
naming the cause); either way every weight, optimizer slot and cache is bit-identical."""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import k3help
import tfnegcache.keras3 as k3

NUM_USERS, NUM_ITEMS, DIM = 24, 60, 8
SPEC = {"item_id": ((), "int32")}


class Model(k3.CachedRetrievalModel):
    """Users and items as embedding tables, keras-rs style (`compute_loss` gets the positive
    item as `y`). `gate`: a trainable scalar whose square root is added to the queries: at 0
    its gradient is infinite while the loss stays finite."""

    def __init__(self, cache_size=64, gate=None, seed=0, logq=False, **loss_kwargs):
        super().__init__()
        self.logq = logq
        keras.utils.set_random_seed(seed)
        self.users = keras.layers.Embedding(NUM_USERS, DIM)
        self.items = keras.layers.Embedding(NUM_ITEMS, DIM)
        self.gate = None
        if gate is not None:
            self.gate = self.add_weight(shape=(), initializer=keras.initializers.Constant(gate),
                                        name="gate")
        self.retrieval_loss = k3.CacheRetrieval(
            cache=k3.NegativeCache(cache_size, SPEC, DIM, seed=seed),
            candidate_model=lambda f: self.items(f["item_id"]), **loss_kwargs)

    def build(self, input_shape):
        self.users.build(input_shape)
        self.items.build(input_shape)
        super().build(input_shape)

    def call(self, users):
        queries = self.users(users)
        if self.gate is not None:
            queries = queries + ops.sqrt(ops.abs(self.gate))
        return queries

    def compute_loss(self, x, y, y_pred, sample_weight=None, training=True):
        probability = ops.full(ops.shape(y), 1.0 / NUM_ITEMS) if self.logq else None
        return self.retrieval_loss(y_pred, self.items(y), candidate_ids=y,
                                   candidate_features={"item_id": y},
                                   sample_weight=sample_weight,
                                   candidate_sampling_probability=probability)


def interactions(num, seed):
    """(users, items): each user prefers the items of its own cluster."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, NUM_USERS, num).astype(np.int32)
    items = ((users % 6) * 10 + rng.integers(0, 10, num)).astype(np.int32)
    return users, items


def full_softmax_loss(model, users, items):
    scores = k3help.numpy(model.users(users)) @ k3help.numpy(model.items.embeddings.value).T
    return float(np.mean(
        np.log(np.exp(scores - scores.max(1, keepdims=True)).sum(1)) + scores.max(1)
        - scores[np.arange(len(items)), items]))


def everything(model):
    """Every weight (caches included) and optimizer variable, by path."""
    return k3help.state(model, *([model.optimizer] if model.optimizer else []))


@pytest.fixture(scope="module", name="trained")
def fixture_trained():
    model = Model(write_back=True)
    model.compile(optimizer=keras.optimizers.Adagrad(0.1))
    model.build((None,))
    users, items = interactions(512, seed=0)
    held_users, held_items = interactions(256, seed=1)
    before = full_softmax_loss(model, held_users, held_items)
    k3.warm_start(model.retrieval_loss.cache, {"item_id": np.arange(NUM_ITEMS, dtype=np.int32)},
                  model.retrieval_loss.candidate_model, id_key="item_id", batch_size=32)
    refresher = k3.CacheRefreshCallback(every_n_steps=5, at_epoch_end=True)
    history = model.fit(users, items, batch_size=32, epochs=2, verbose=0, shuffle=False,
                        callbacks=[refresher])
    after = full_softmax_loss(model, held_users, held_items)
    return model, history.history, before, after, refresher


def test_fit_trains_and_logs_the_caches_metrics(trained):
    model, history, before, after, _ = trained
    assert sorted(history) == ["cache_fill", "cache_staleness", "loss", "skipped_steps"]
    assert history["skipped_steps"] == [0.0, 0.0]
    assert history["cache_fill"][-1] == NUM_ITEMS / 64   # warm-started with every item
    assert all(np.isfinite(history["loss"])) and 0 < history["cache_staleness"][0] < 1
    assert after < before - 0.3, (before, after)          # held-out full-softmax loss falls
    cache = model.retrieval_loss.cache
    assert int(k3help.numpy(model.optimizer.iterations.value)) == 32
    assert int(k3help.numpy(cache.step.value)) == 32      # one cache step per training step


def test_the_refresh_callback_leaves_every_cached_embedding_fresh(trained):
    model, _, _, _, refresher = trained
    assert refresher.refreshes == 32 // 5 + 2              # every 5 steps, and per epoch
    cache = model.retrieval_loss.cache
    filled = int(k3help.numpy(cache.num_filled.value))
    ids = k3help.numpy(cache.ids.value)[:filled]
    np.testing.assert_allclose(k3help.numpy(cache.embeddings.value)[:filled],
                               k3help.numpy(model.items.embeddings.value)[ids], atol=1e-6)


def test_evaluate_and_predict_change_nothing(trained):
    model = trained[0]
    users, items = interactions(64, seed=2)
    before = everything(model)
    logs = model.evaluate(users, items, batch_size=32, verbose=0, return_dict=True)
    model.predict(users, batch_size=32, verbose=0)
    k3help.assert_same_state(before, everything(model))
    assert sorted(logs) == ["loss"] and np.isfinite(logs["loss"])


def test_saved_weights_restore_the_cache_and_its_index(trained, tmp_path):
    model = trained[0]
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    restored = Model(seed=3)
    restored.build((None,))
    restored.load_weights(path)
    k3help.assert_same_state(k3help.state(model.retrieval_loss.cache),
                             k3help.state(restored.retrieval_loss.cache))
    ids = np.arange(NUM_ITEMS, dtype=np.int32)
    np.testing.assert_array_equal(k3help.numpy(restored.retrieval_loss.cache.lookup(ids)),
                                  k3help.numpy(model.retrieval_loss.cache.lookup(ids)))


def _gate_model():
    model = Model(gate=0.0)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    model.build((None,))
    model.optimizer.build(model.trainable_variables)
    users, items = interactions(96, seed=4)
    return model, users, items


@pytest.mark.skipif(k3help.BACKEND != "tensorflow", reason="TensorFlow raises")
def test_a_failed_step_raises_on_tensorflow_and_changes_nothing():
    import tensorflow as tf
    model, users, items = _gate_model()
    before = everything(model)
    # A dataset of unknown batch size: the step is traced with dynamic shapes.
    data = tf.data.Dataset.from_tensor_slices((users, items)).batch(32)
    assert data.element_spec[0].shape[0] is None
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"the gradient of `model(_\d+)?/gate` has NaN or Inf \(non-finite "
                             r"values\); the step changed nothing"):
        model.fit(data, epochs=1, verbose=0)
    k3help.assert_same_state(before, everything(model))


@pytest.mark.skipif(k3help.BACKEND != "jax", reason="a jitted JAX step skips")
def test_a_failed_step_is_skipped_on_jax_and_fit_stops_naming_the_cause():
    model, users, items = _gate_model()
    before = everything(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(users, items, batch_size=32, epochs=2, verbose=0).history
    messages = [str(w.message) for w in caught if "tfnegcache" in str(w.message)]
    assert len(messages) == 1
    assert "training step 0 of this epoch was skipped: the gradient of `" in messages[0]
    assert "/gate` has NaN or Inf (non-finite values)" in messages[0]
    assert "fit stopped" in messages[0]
    assert model.skipped_step_message == messages[0]
    assert history["skipped_steps"] == [1.0]                 # stopped after that step
    k3help.assert_same_state(before, everything(model))


@pytest.mark.skipif(k3help.BACKEND != "jax", reason="a jitted JAX step skips")
def test_on_jax_a_skipped_step_is_the_same_as_leaving_its_batch_out():
    users, items = interactions(96, seed=5)
    weights = np.ones(96, np.float32)
    weights[40] = np.nan                                     # the second batch of 32
    keep = np.r_[0:32, 64:96]
    runs = []
    for data in ((users, items, weights), (users[keep], items[keep], weights[keep])):
        model = Model(seed=1)
        model.compile(optimizer=keras.optimizers.Adam(0.01))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            history = model.fit(*data[:2], sample_weight=data[2], batch_size=32, epochs=1,
                                shuffle=False, verbose=0,
                                callbacks=[k3.StopOnSkippedStep(stop=False)]).history
        runs.append((everything(model), history))
    (skipped, skipped_history), (dropped, dropped_history) = runs
    assert skipped_history["skipped_steps"] == [1.0] and dropped_history["skipped_steps"] == [0.0]
    k3help.assert_same_state(dropped, skipped)


def test_uniform_draws_with_logq_train():
    model = Model(sampling="uniform", num_negatives=2, refresh_per_step=4, logq=True)
    model.compile(optimizer=keras.optimizers.Adagrad(0.1))
    users, items = interactions(128, seed=6)
    history = model.fit(users, items, batch_size=32, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0]) and history["skipped_steps"] == [0.0]
    assert history["cache_fill"][-1] > 0


def test_two_losses_sharing_a_cache_are_refused_at_compile():
    model = Model()
    model.other_loss = k3.CacheRetrieval(cache=model.retrieval_loss.cache,
                                         candidate_model=model.retrieval_loss.candidate_model)
    with pytest.raises(ValueError, match="share the cache"):
        model.compile(optimizer="adam")
