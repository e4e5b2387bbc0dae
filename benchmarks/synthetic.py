"""A synthetic retrieval corpus with planted coarse/fine cluster structure.

The corpus is built so that hard negatives matter, as in real search: a random or in-batch
negative almost never comes from the positive's own fine cluster, yet the candidates of a
fine cluster share all their cluster tokens and differ only by their item tokens. A model
trained with in-batch negatives can get far by finding the right cluster; telling the
positive from its fine-cluster neighbours needs item-level signal, which is what a pool of
hard negatives from a cache should teach.

Vocabulary. Token 0 is reserved (padding; never emitted). With `k = cluster_tokens`, `C`
coarse clusters and `F = C * fine_per_coarse` fine clusters, the ids are split into ranges:

- coarse tokens `[1, 1 + C k)`: coarse cluster `c` owns the `k` tokens `1 + c k + [0, k)`;
- fine tokens `[1 + C k, 1 + C k + F k)`: fine cluster `f` owns `k` tokens the same way;
- item tokens `[1 + C k + F k, vocab_size)`: drawn uniformly, they carry item identity.

Candidates. `N = num_candidates` candidates with ids `0..N-1` are split into `F` fine clusters
of equal size `N / F` by a seeded random permutation (so an id says nothing about its
cluster); fine cluster `f` lies in coarse cluster `f // fine_per_coarse`. A candidate's
`tokens_per_candidate` tokens are laid out as `[k coarse | k fine | item tokens]`: all `k`
tokens of its coarse cluster, all `k` of its fine cluster, and
`tokens_per_candidate - 2k` item tokens drawn uniformly with replacement from the item range.
Popularity is Zipf-like, `p ∝ 1 / rank^popularity_exponent` over a random ranking.

Preference model (ground truth). A query is generated from a target candidate `t` drawn with
probability `popularity[t]`, and its positive is exactly `t`. Its `query_tokens` tokens are,
in a random order: `query_item_tokens` of `t`'s item tokens (distinct positions, drawn
without replacement), `query_cluster_tokens` of its fine tokens, `query_cluster_tokens` of
its coarse tokens, and the rest noise tokens drawn uniformly from the item range. The item
tokens identify `t` inside its fine cluster (other candidates share them only by chance), so
the oracle `token_overlap` ranks the positive first in its fine cluster almost always, while
cluster tokens alone tie the whole fine cluster.

Determinism. The candidate table is a function of `seed`. Query `i` of a split is a function
of `(seed, split, i)` only: its random words come from a counter-based hash of the query
index, so any slice `[start, start + n)` is generated directly, streaming in chunks of any
size reproduces `queries()` exactly, and the train and test splits are disjoint random
streams (different derived keys) from the same preference model.
"""

import dataclasses
from typing import Callable, Dict, Tuple

import numpy as np
import tensorflow as tf

SPLITS = ("train", "test")
# SeedSequence "purposes", so the candidate table and each query split get independent streams.
_CANDIDATE_STREAM = 0
_SPLIT_STREAM = {"train": 1, "test": 2}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
DEFAULT_CHUNK_SIZE = 4096


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: a bijective avalanche hash of uint64 words (wraps mod 2^64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _random_words(key: np.uint64, indices: np.ndarray, width: int) -> np.ndarray:
    """Pseudo-random uint64 words that depend only on `(key, index, column)`.

    Args:
        key: the split's derived key.
        indices: `[n]` int64 query indices.
        width: words per query.

    Returns:
        `[n, width]` uint64.
    """
    rows = _mix64(key + indices.astype(np.uint64)[:, None] * _GOLDEN)
    return _mix64(rows + np.arange(1, width + 1, dtype=np.uint64) * _GOLDEN)


def _uniform01(words: np.ndarray) -> np.ndarray:
    """Maps uint64 words to float64 uniform on [0, 1) with 53 random bits."""
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _choose(pool: np.ndarray, num: int, keys: np.ndarray) -> np.ndarray:
    """Picks `num` entries per row without replacement, ordered by random `keys`.

    Args:
        pool: `[n, P]` values.
        num: entries to keep per row, `<= P`.
        keys: `[n, P]` random sort keys.

    Returns:
        `[n, num]` values of `pool`.
    """
    order = np.argsort(keys, axis=1)[:, :num]
    return np.take_along_axis(pool, order, axis=1)


def token_overlap(query_tokens: np.ndarray, candidate_tokens: np.ndarray) -> np.ndarray:
    """The oracle score: how many distinct query tokens occur among a candidate's tokens.

    Args:
        query_tokens: `[Q]` tokens of one query.
        candidate_tokens: `[M, T]` tokens of the candidates to score.

    Returns:
        `[M]` int64 scores.
    """
    distinct = np.unique(query_tokens)
    present = candidate_tokens[:, :, None] == distinct[None, None, :]  # [M, T, distinct]
    return present.any(axis=1).sum(axis=1)


def _chunked_dataset(
    total: int,
    chunk_size: int,
    make_chunk: Callable[[int, int], Dict[str, np.ndarray]],
    signature: Dict[str, tf.TensorSpec],
) -> tf.data.Dataset:
    """Streams `total` examples built `chunk_size` at a time by a numpy function.

    Only one chunk is materialised at a time; chunks are produced in order, so the examples
    come out in index order.

    Args:
        total: number of examples.
        chunk_size: examples per call of `make_chunk`.
        make_chunk: `(start, count) -> dict` of numpy arrays with leading dimension `count`.
        signature: per-example spec of each key.

    Returns:
        A `tf.data.Dataset` of per-example dicts matching `signature`.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    keys = sorted(signature)
    num_chunks = -(-total // chunk_size)

    def chunk(index):
        start = int(index) * chunk_size
        arrays = make_chunk(start, min(chunk_size, total - start))
        return [arrays[k].astype(signature[k].dtype.as_numpy_dtype, copy=False) for k in keys]

    def to_dict(index):
        tensors = tf.numpy_function(chunk, [index], [signature[k].dtype for k in keys])
        for key, tensor in zip(keys, tensors):
            tensor.set_shape([None, *signature[key].shape])
        return dict(zip(keys, tensors))

    return tf.data.Dataset.range(num_chunks).map(to_dict).unbatch()


@dataclasses.dataclass(eq=False)
class SyntheticCorpus:
    """A planted-structure retrieval corpus; build it with `make_corpus`.

    The module docstring describes the vocabulary, the candidate layout and the preference
    model. Token arrays are int32 (half the memory of int64; Keras embeddings take int32),
    ids are int64.

    Attributes:
        num_candidates: `N`.
        tokens_per_candidate: `T`.
        query_tokens: `Q`, tokens per query.
        num_coarse: number of coarse clusters.
        fine_per_coarse: fine clusters per coarse cluster.
        cluster_tokens: `k`, tokens owned by each coarse and each fine cluster.
        query_item_tokens: the target's item tokens copied into a query.
        query_cluster_tokens: fine (and, as many, coarse) tokens copied into a query.
        vocab_size: all tokens lie in `[1, vocab_size)`; 0 is reserved for padding.
        popularity_exponent: Zipf exponent `a` of `p ∝ 1 / rank^a`.
        seed: the seed everything is derived from.
        candidate_ids: `[N]` int64, `0..N-1`; row `i` of every array is candidate `i`.
        candidate_tokens: `[N, T]` int32, laid out `[k coarse | k fine | item tokens]`.
        fine_cluster: `[N]` int32 in `[0, num_coarse * fine_per_coarse)`.
        coarse_cluster: `[N]` int32, `fine_cluster // fine_per_coarse`.
        popularity: `[N]` float64, the probability of being a query's positive; sums to 1.
    """

    num_candidates: int
    tokens_per_candidate: int
    query_tokens: int
    num_coarse: int
    fine_per_coarse: int
    cluster_tokens: int
    query_item_tokens: int
    query_cluster_tokens: int
    vocab_size: int
    popularity_exponent: float
    seed: int
    candidate_ids: np.ndarray = dataclasses.field(repr=False)
    candidate_tokens: np.ndarray = dataclasses.field(repr=False)
    fine_cluster: np.ndarray = dataclasses.field(repr=False)
    coarse_cluster: np.ndarray = dataclasses.field(repr=False)
    popularity: np.ndarray = dataclasses.field(repr=False)
    _cumulative: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        # The CDF for inverse-CDF sampling of targets; the last entry is forced to 1 so float
        # rounding can never push a draw past the last candidate.
        self._cumulative = np.cumsum(self.popularity)
        self._cumulative[-1] = 1.0

    @property
    def item_token_range(self) -> Tuple[int, int]:
        """`[low, high)` of the item tokens (also where query noise tokens come from)."""
        num_fine = self.num_coarse * self.fine_per_coarse
        return 1 + (self.num_coarse + num_fine) * self.cluster_tokens, self.vocab_size

    @property
    def query_noise_tokens(self) -> int:
        """Noise tokens per query: what `query_tokens` leaves after item and cluster tokens."""
        return self.query_tokens - self.query_item_tokens - 2 * self.query_cluster_tokens

    def candidates_dataset(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> tf.data.Dataset:
        """Streams the candidate table in id order.

        Args:
            chunk_size: rows copied out of the table per step.

        Returns:
            A dataset of dicts `{"candidate_id": int64 [], "candidate_tokens": int32 [T]}`.
        """
        signature = {
            "candidate_id": tf.TensorSpec([], tf.int64),
            "candidate_tokens": tf.TensorSpec([self.tokens_per_candidate], tf.int32),
        }

        def make_chunk(start: int, count: int) -> Dict[str, np.ndarray]:
            rows = slice(start, start + count)
            return {
                "candidate_id": self.candidate_ids[rows],
                "candidate_tokens": self.candidate_tokens[rows],
            }

        return _chunked_dataset(self.num_candidates, chunk_size, make_chunk, signature)

    def queries(
        self, num_queries: int, split: str = "train", start: int = 0
    ) -> Dict[str, np.ndarray]:
        """Generates queries `start .. start + num_queries - 1` of a split.

        Args:
            num_queries: `n`, how many queries.
            split: `"train"` or `"test"`; the two are independent streams.
            start: index of the first query; query `i` is the same whatever slice it is in.

        Returns:
            A dict of numpy arrays:
            `query_tokens` `[n, Q]` int32; `candidate_id` `[n]` int64, the positive;
            `candidate_tokens` `[n, T]` int32, the positive's tokens; `sampling_probability`
            `[n]` float32, the positive's popularity (for logQ correction).
        """
        if num_queries < 0:
            raise ValueError(f"num_queries must be >= 0, got {num_queries}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        key = _split_key(self.seed, split)
        k = self.cluster_tokens
        num_items = self.tokens_per_candidate - 2 * k
        widths = {
            "target": 1,
            "item": num_items,
            "fine": k,
            "coarse": k,
            "noise": self.query_noise_tokens,
            "order": self.query_tokens,
        }
        indices = np.arange(start, start + num_queries, dtype=np.int64)
        words = _random_words(key, indices, sum(widths.values()))
        parts = dict(zip(widths, np.split(words, np.cumsum(list(widths.values()))[:-1], axis=1)))

        targets = np.searchsorted(self._cumulative, _uniform01(parts["target"][:, 0]), side="right")
        targets = np.minimum(targets, self.num_candidates - 1)
        tokens = self.candidate_tokens[targets]
        low, high = self.item_token_range
        noise = low + (parts["noise"] % np.uint64(high - low)).astype(np.int64)
        pieces = [
            _choose(tokens[:, 2 * k :], self.query_item_tokens, parts["item"]),
            _choose(tokens[:, k : 2 * k], self.query_cluster_tokens, parts["fine"]),
            _choose(tokens[:, :k], self.query_cluster_tokens, parts["coarse"]),
            noise.astype(np.int32),
        ]
        # Shuffled, so a model cannot tell item, cluster and noise tokens apart by position.
        query = _choose(np.concatenate(pieces, axis=1), self.query_tokens, parts["order"])
        return {
            "query_tokens": query,
            "candidate_id": self.candidate_ids[targets],
            "candidate_tokens": tokens,
            "sampling_probability": self.popularity[targets].astype(np.float32),
        }

    def queries_dataset(
        self, num_queries: int, split: str = "train", chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> tf.data.Dataset:
        """Streams `queries(num_queries, split)` per example, generated `chunk_size` at a time.

        Args:
            num_queries: how many queries, from index 0.
            split: `"train"` or `"test"`.
            chunk_size: queries generated per numpy call; the output does not depend on it.

        Returns:
            A dataset of per-example dicts with the keys and dtypes of `queries()`.
        """
        if num_queries < 0:
            raise ValueError(f"num_queries must be >= 0, got {num_queries}")
        _split_key(self.seed, split)  # Fail now on a bad split, not when the dataset runs.
        signature = {
            "query_tokens": tf.TensorSpec([self.query_tokens], tf.int32),
            "candidate_id": tf.TensorSpec([], tf.int64),
            "candidate_tokens": tf.TensorSpec([self.tokens_per_candidate], tf.int32),
            "sampling_probability": tf.TensorSpec([], tf.float32),
        }

        def make_chunk(start: int, count: int) -> Dict[str, np.ndarray]:
            return self.queries(count, split=split, start=start)

        return _chunked_dataset(num_queries, chunk_size, make_chunk, signature)


def _split_key(seed: int, split: str) -> np.uint64:
    """The uint64 key of a split's query stream, derived from the corpus seed."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.random.SeedSequence([seed, _SPLIT_STREAM[split]]).generate_state(1, np.uint64)[0]


def _check_config(
    num_candidates: int,
    tokens_per_candidate: int,
    query_tokens: int,
    num_coarse: int,
    fine_per_coarse: int,
    cluster_tokens: int,
    query_item_tokens: int,
    query_cluster_tokens: int,
    vocab_size: int,
    popularity_exponent: float,
    seed: int,
) -> None:
    """Raises `ValueError` naming the first inconsistent argument of `make_corpus`."""
    for name, value in [
        ("num_candidates", num_candidates),
        ("num_coarse", num_coarse),
        ("fine_per_coarse", fine_per_coarse),
        ("cluster_tokens", cluster_tokens),
        ("query_item_tokens", query_item_tokens),
    ]:
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    for name, value in [
        ("query_cluster_tokens", query_cluster_tokens),
        ("popularity_exponent", popularity_exponent),
        ("seed", seed),
    ]:
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    num_fine = num_coarse * fine_per_coarse
    if num_candidates % num_fine:
        raise ValueError(
            f"num_candidates={num_candidates} must be divisible by num_coarse * fine_per_coarse "
            f"= {num_coarse} * {fine_per_coarse} = {num_fine} (fine clusters are equal-sized)"
        )
    num_items = tokens_per_candidate - 2 * cluster_tokens
    if num_items < query_item_tokens:
        raise ValueError(
            f"tokens_per_candidate={tokens_per_candidate} leaves {num_items} item tokens after "
            f"2 * cluster_tokens = {2 * cluster_tokens}; need at least "
            f"query_item_tokens={query_item_tokens}"
        )
    if query_cluster_tokens > cluster_tokens:
        raise ValueError(
            f"query_cluster_tokens={query_cluster_tokens} must be <= "
            f"cluster_tokens={cluster_tokens}"
        )
    needed = query_item_tokens + 2 * query_cluster_tokens
    if query_tokens < needed:
        raise ValueError(
            f"query_tokens={query_tokens} must be >= query_item_tokens + 2 * query_cluster_tokens "
            f"= {needed}"
        )
    first_item = 1 + (num_coarse + num_fine) * cluster_tokens
    if vocab_size - first_item < num_items:
        raise ValueError(
            f"vocab_size={vocab_size} leaves {vocab_size - first_item} item tokens after "
            f"{first_item} reserved and cluster tokens; need at least {num_items}"
        )
    if vocab_size > np.iinfo(np.int32).max:
        raise ValueError(f"vocab_size={vocab_size} must fit int32 (<= {np.iinfo(np.int32).max})")


def make_corpus(
    num_candidates: int = 2**14,
    tokens_per_candidate: int = 32,
    query_tokens: int = 16,
    num_coarse: int = 32,
    fine_per_coarse: int = 8,
    cluster_tokens: int = 4,
    query_item_tokens: int = 8,
    query_cluster_tokens: int = 2,
    vocab_size: int = 2**16,
    popularity_exponent: float = 0.8,
    seed: int = 0,
) -> SyntheticCorpus:
    """Builds the candidate table of a planted-structure corpus (see the module docstring).

    Args:
        num_candidates: `N`, divisible by `num_coarse * fine_per_coarse`.
        tokens_per_candidate: `T`, tokens per candidate,
            `>= 2 * cluster_tokens + query_item_tokens`.
        query_tokens: `Q`, tokens per query, `>= query_item_tokens + 2 * query_cluster_tokens`;
            the rest are noise.
        num_coarse: coarse clusters.
        fine_per_coarse: fine clusters inside each coarse cluster. For in-batch negatives
            to come from the positive's fine cluster only rarely, make the number of fine
            clusters large against the batch: the defaults (256 fine clusters) suit
            N <= 2^14; `benchmarks.quality_at_time` uses N / 64 fine clusters of 64 (at
            N = 2^20, B = 256: 16,384 clusters, and 1.5% of queries have a same-cluster
            in-batch negative, against 62% with 256 clusters).
        cluster_tokens: tokens owned by each coarse and each fine cluster; every candidate
            carries all tokens of its clusters.
        query_item_tokens: item tokens of the positive copied into each query.
        query_cluster_tokens: fine tokens, and as many coarse tokens, copied into each query.
        vocab_size: tokens lie in `[1, vocab_size)`; what the cluster tokens leave is the item
            range. The default 2^16 leaves ~60k item tokens, so two candidates share an item
            token only by chance.
        popularity_exponent: `a` in `p ∝ 1 / rank^a`; 0 is uniform. The default 0.8 keeps the
            most popular candidate at a few percent of queries for `N >= 2^12`.
        seed: non-negative; the same seed gives the same corpus and query streams.

    Returns:
        The `SyntheticCorpus`. At `N = 2^21` its arrays take 320 MiB (about 460 MiB at peak
        while building), and building takes about a second.
    """
    _check_config(
        num_candidates, tokens_per_candidate, query_tokens, num_coarse, fine_per_coarse,
        cluster_tokens, query_item_tokens, query_cluster_tokens, vocab_size,
        popularity_exponent, seed,
    )
    rng = np.random.default_rng(np.random.SeedSequence([seed, _CANDIDATE_STREAM]))
    num_fine = num_coarse * fine_per_coarse
    k = cluster_tokens
    # A random permutation cut into equal blocks: balanced clusters, unrelated to the ids.
    fine = (rng.permutation(num_candidates) // (num_candidates // num_fine)).astype(np.int32)
    coarse = fine // np.int32(fine_per_coarse)

    offsets = np.arange(k, dtype=np.int32)
    first_fine = 1 + num_coarse * k
    first_item = first_fine + num_fine * k
    tokens = np.empty((num_candidates, tokens_per_candidate), dtype=np.int32)
    tokens[:, :k] = 1 + coarse[:, None] * k + offsets
    tokens[:, k : 2 * k] = first_fine + fine[:, None] * k + offsets
    tokens[:, 2 * k :] = rng.integers(
        first_item, vocab_size, size=(num_candidates, tokens_per_candidate - 2 * k), dtype=np.int32
    )

    ranks = rng.permutation(num_candidates).astype(np.float64) + 1.0
    popularity = ranks**-popularity_exponent
    popularity /= popularity.sum()

    return SyntheticCorpus(
        num_candidates=num_candidates,
        tokens_per_candidate=tokens_per_candidate,
        query_tokens=query_tokens,
        num_coarse=num_coarse,
        fine_per_coarse=fine_per_coarse,
        cluster_tokens=cluster_tokens,
        query_item_tokens=query_item_tokens,
        query_cluster_tokens=query_cluster_tokens,
        vocab_size=vocab_size,
        popularity_exponent=popularity_exponent,
        seed=seed,
        candidate_ids=np.arange(num_candidates, dtype=np.int64),
        candidate_tokens=tokens,
        fine_cluster=fine,
        coarse_cluster=coarse,
        popularity=popularity,
    )
