"""A small planted-preference corpus and two-tower model shared by the tests.

Items sit in clusters; each user draws positives from its own cluster by a skewed popularity
(and sometimes from anywhere). The candidate tower reads an item id and three token ids, so
the cache must store and re-encode more than an id. In-batch negatives are popularity-biased
here, so a model trained against the whole cache ranks held-out positives better.
"""

import tfnegcache  # first: it selects Keras 2 before TensorFlow loads

import numpy as np
import tensorflow as tf

NUM_CLUSTERS = 20
ITEMS_PER_CLUSTER = 15
NUM_ITEMS = NUM_CLUSTERS * ITEMS_PER_CLUSTER
NUM_USERS = 120
NUM_TOKENS = 3
VOCAB = 64

FEATURE_SPEC = {
    "item_id": tf.TensorSpec([], tf.int64),
    "tokens": tf.TensorSpec([NUM_TOKENS], tf.int64),
}


def item_table():
    """`{"item_id": [NUM_ITEMS], "tokens": [NUM_ITEMS, 3]}`: the cluster, item mod 7, item mod 11."""
    ids = np.arange(NUM_ITEMS, dtype=np.int64)
    tokens = np.stack([ids // ITEMS_PER_CLUSTER, 20 + ids % 7, 30 + ids % 11], axis=1)
    return {"item_id": ids, "tokens": tokens.astype(np.int64)}


def interactions(num, seed):
    """`num` (user, item) pairs from the planted preference model, as feature dicts."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, ITEMS_PER_CLUSTER + 1) ** 1.2
    popularity /= popularity.sum()
    users = rng.integers(0, NUM_USERS, num)
    in_cluster = rng.random(num) < 0.85
    cluster = np.where(in_cluster, users % NUM_CLUSTERS, rng.integers(0, NUM_CLUSTERS, num))
    rank = rng.choice(ITEMS_PER_CLUSTER, size=num, p=popularity)
    items = cluster * ITEMS_PER_CLUSTER + rank
    table = item_table()
    return {
        "user_id": users.astype(np.int64),
        "item_id": items.astype(np.int64),
        "tokens": table["tokens"][items],
    }


class CandidateTower(tf.keras.Model):
    """Item id embedding plus the mean of token embeddings."""

    def __init__(self, dim):
        super().__init__()
        self.ids = tf.keras.layers.Embedding(NUM_ITEMS, dim)
        self.tokens = tf.keras.layers.Embedding(VOCAB, dim)

    def call(self, features):
        return self.ids(features["item_id"]) + tf.reduce_mean(self.tokens(features["tokens"]), 1)


class ToyModel(tfnegcache.CachedRetrievalModel):
    """The two-tower model of the tests; `cache_size=None` trains with in-batch negatives only.

    `embedding_dtype` is the cache's storage dtype of embeddings, `scoring_dtype` the dtype
    its sampler scores in (`NegativeCache`). With `build_on_compile` (the default), `compile`
    also creates the towers' and the optimizer's variables (`build_variables`).
    """

    def __init__(self, cache_size=None, dim=16, seed=0, num_negatives=1,
                 embedding_dtype=tf.float32, scoring_dtype=None, build_on_compile=True,
                 **task_kwargs):
        super().__init__()
        self.build_on_compile = build_on_compile
        tf.keras.utils.set_random_seed(seed)
        self.query_tower = tf.keras.layers.Embedding(NUM_USERS, dim)
        self.candidate_tower = CandidateTower(dim)
        cache = None
        if cache_size:
            cache = tfnegcache.NegativeCache(cache_size, FEATURE_SPEC, dim, seed=seed,
                                             embedding_dtype=embedding_dtype,
                                             scoring_dtype=scoring_dtype)
        self.task = tfnegcache.CacheRetrieval(
            cache=cache, candidate_model=self.candidate_tower, num_negatives=num_negatives,
            **task_kwargs)

    def call(self, user_ids):
        return self.query_tower(user_ids)

    def compile(self, *args, **kwargs):  # pylint: disable=arguments-differ
        super().compile(*args, **kwargs)
        if self.build_on_compile:
            self.build_variables()

    def build_variables(self):
        """Creates the towers' and the optimizer's variables now, eagerly (in the strategy's
        scope if `compile` is in one).

        A `tf.function` whose first trace creates variables traces once more, without
        creating any; so `fit` of a model its first step builds traces that step twice.
        Built beforehand, it traces once (the suite's in-process test files: 479 -> 418 CPU
        seconds, docs/tests.md, "What keeps it at that"). `build_on_compile=False` keeps the
        first way, and
        `test_model.py::test_a_model_built_by_its_first_step_trains_as_one_built_before`
        checks that the two train alike, bit for bit."""
        self.query_tower(tf.zeros([1], tf.int64))
        self.candidate_tower({name: tf.zeros([1, *spec.shape], spec.dtype)
                              for name, spec in FEATURE_SPEC.items()})
        # As `apply_gradients` does, so the slots get the same names ("Adam/m/...").
        with tf.name_scope(getattr(self.optimizer, "inner_optimizer", self.optimizer).name):
            self.optimizer.build(self.trainable_variables)

    def compute_loss(self, features, training=False):
        candidates = {"item_id": features["item_id"], "tokens": features["tokens"]}
        return self.task(
            self.query_tower(features["user_id"]), self.candidate_tower(candidates),
            candidate_ids=features["item_id"], candidate_features=candidates,
            compute_metrics=not training)


def recall_at(model, data, k=10):
    """Fraction of `data` pairs whose item is in the user's top k over all items."""
    table = item_table()
    items = model.candidate_tower({k_: tf.constant(v) for k_, v in table.items()})
    scores = tf.matmul(model.query_tower(tf.constant(data["user_id"])), items, transpose_b=True)
    top = tf.math.top_k(scores, k).indices.numpy()
    return float(np.mean(np.any(top == data["item_id"][:, None], axis=1)))


def full_softmax_loss(model, data):
    """Mean cross entropy of `data` pairs over all items (the objective the cache estimates)."""
    table = item_table()
    items = model.candidate_tower({k_: tf.constant(v) for k_, v in table.items()})
    scores = tf.matmul(model.query_tower(tf.constant(data["user_id"])), items, transpose_b=True)
    return float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        tf.constant(data["item_id"]), scores)))


def dataset(data, batch_size):
    return tf.data.Dataset.from_tensor_slices(data).batch(batch_size, drop_remainder=True)
