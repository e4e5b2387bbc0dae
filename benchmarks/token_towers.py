"""The token-bag towers of the step-time, quality and transaction-cost benchmarks, and the
two-tower model over them (`TwoTower`): in-batch, logQ, cache or full-softmax negatives."""

import tfnegcache  # first: selects Keras 2 before TensorFlow is imported

import tensorflow as tf  # pylint: disable=g-bad-import-order

HASH_BUCKETS = 2**14
HIDDEN_UNITS = 128


class TokenBagTower(tf.keras.Model):
    """Mean of hashed token embeddings, then an MLP: `[M, T]` int tokens -> `[M, dim]`.

    Tokens are hashed (`token % buckets`) into a moderate table: with tf-keras Adam a dense
    update of a 2^16-row table costs more than the towers themselves.
    """

    def __init__(self, dim=64, buckets=HASH_BUCKETS, hidden=HIDDEN_UNITS, normalize=False,
                 name=None):
        super().__init__(name=name)
        self.normalize = normalize
        self.buckets = buckets
        self.table = tf.keras.layers.Embedding(buckets, dim)
        self.hidden = tf.keras.layers.Dense(hidden, activation="relu")
        self.out = tf.keras.layers.Dense(dim)

    def call(self, tokens):
        tokens = tf.math.floormod(tf.cast(tokens, tf.int32), self.buckets)
        bag = tf.reduce_mean(self.table(tokens), axis=1)
        out = self.out(self.hidden(bag)) + bag
        return tf.math.l2_normalize(out, axis=-1) if self.normalize else out


REFERENCE_VOCAB = 50_000


class ReferenceBagTower(tf.keras.Model):
    """The reference code's tower: a token bag over a `vocab`-row table (no hashing beyond
    `token % vocab`), mean, `Dense(hidden, relu)`, `Dense(dim)`. Its table gets a dense Adam
    update each step, as in the reference."""

    def __init__(self, dim=64, vocab=REFERENCE_VOCAB, hidden=HIDDEN_UNITS, name=None):
        super().__init__(name=name)
        self.vocab = vocab
        self.table = tf.keras.layers.Embedding(vocab, dim)
        self.hidden = tf.keras.layers.Dense(hidden, activation="relu")
        self.out = tf.keras.layers.Dense(dim)

    def call(self, tokens):
        tokens = tf.math.floormod(tf.cast(tokens, tf.int32), self.vocab)
        return self.out(self.hidden(tf.reduce_mean(self.table(tokens), axis=1)))


class TwoTower(tfnegcache.CachedRetrievalModel):
    """Query tower over query tokens, candidate tower over the candidate's tokens.

    `cache_size=None`: in-batch negatives only (`logq` adds the logQ correction).
    `normalize`: unit-norm embeddings (use with a temperature).
    `all_candidate_tokens`: `[N, T]`, the whole corpus (ids are row numbers): the exact full
    softmax, every candidate through the candidate tower each step (no cache, no sampling).
    `buckets`, `hidden`: both towers' hash table rows and MLP width (capacity).
    `tower`: "hashed" (`TokenBagTower`) or "reference" (`ReferenceBagTower`, the reference
    code's towers: a 50k-token table, mean, Dense(128, relu), Dense(dim)).
    `scoring_dtype`: the cache's (`NegativeCache(scoring_dtype=...)`); None leaves it out.
    """

    def __init__(self, tokens_per_candidate, cache_size=None, dim=64, logq=False, seed=0,
                 temperature=None, embedding_dtype=tf.float32, use_in_batch_negatives=True,
                 normalize=False, num_negatives=1, refresh_per_step=0, all_candidate_tokens=None,
                 buckets=HASH_BUCKETS, hidden=HIDDEN_UNITS, tower="hashed",
                 scoring_dtype=None):
        super().__init__()
        tf.keras.utils.set_random_seed(seed)
        if tower == "reference":
            self.query_tower = ReferenceBagTower(dim, hidden=hidden, name="query_tower")
            self.candidate_tower = ReferenceBagTower(dim, hidden=hidden, name="candidate_tower")
        elif tower == "hashed":
            self.query_tower = TokenBagTower(dim, buckets, hidden, normalize=normalize,
                                             name="query_tower")
            self.candidate_tower = TokenBagTower(dim, buckets, hidden, normalize=normalize,
                                                 name="candidate_tower")
        else:
            raise ValueError(f"tower must be 'hashed' or 'reference', got {tower!r}")
        self.logq = logq
        self.temperature = temperature
        self.all_candidate_tokens = None
        if all_candidate_tokens is not None:
            self.all_candidate_tokens = tf.constant(all_candidate_tokens)
        cache = None
        if cache_size:
            spec = {"candidate_tokens": tf.TensorSpec([tokens_per_candidate], tf.int32)}
            extra = {} if scoring_dtype is None else {"scoring_dtype": scoring_dtype}
            cache = tfnegcache.NegativeCache(cache_size, spec, dim, seed=seed,
                                             embedding_dtype=embedding_dtype, **extra)
        self.task = tfnegcache.CacheRetrieval(
            cache=cache, temperature=temperature,
            candidate_model=lambda f: self.candidate_tower(f["candidate_tokens"]),
            use_in_batch_negatives=use_in_batch_negatives, num_negatives=num_negatives,
            refresh_per_step=refresh_per_step)

    def compute_loss(self, features, training=False):
        queries = self.query_tower(features["query_tokens"])
        if self.all_candidate_tokens is not None:
            everything = self.candidate_tower(self.all_candidate_tokens)
            logits = tf.matmul(queries, everything, transpose_b=True) / (self.temperature or 1.0)
            # Summed over the batch, as tfrs.tasks.Retrieval's default loss is.
            return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=features["candidate_id"], logits=logits))
        candidates = self.candidate_tower(features["candidate_tokens"])
        kwargs = {}
        if self.logq:
            kwargs["candidate_sampling_probability"] = features["sampling_probability"]
        if self.task.cache is not None:
            kwargs.update(candidate_ids=features["candidate_id"],
                          candidate_features={"candidate_tokens": features["candidate_tokens"]})
        return self.task(queries, candidates, compute_metrics=False, **kwargs)
