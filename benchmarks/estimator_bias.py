"""The bias of the corrected estimator on a stale cache, against k (docs/algorithm.md, step 5).

One query, a positive outside the cache and 40 cached candidates whose stale scores are the
fresh ones plus N(0, 1) noise; the softmax is over [positive, cache] (no in-batch
negatives). The library's `CacheRetrieval` is run with `num_negatives=k` on `draws` copies of
the query in one batch (each row draws independently), and its per-row loss gives the
cache's softmax weight, `1 - exp(-loss)`. Printed against the exact values of the fresh
softmax, per k: the mean weight, the mean loss and their biases, and the relative error of
the mean gradient with respect to the query.

    python -m benchmarks.estimator_bias                 # k = 1, 2, 4, 16, 64; 20,000 draws
"""

import argparse

import numpy as np

DIM, SLOTS = 8, 40


def _tf():
    import tfnegcache  # noqa: F401  (first: selects Keras 2)
    import tensorflow as tf
    return tf


def setup(seed: int = 0, target_weight: float = 0.8):
    """`(query [d], fresh [SLOTS + 1, d], stale [SLOTS, d])`; row SLOTS of `fresh` is the
    positive, placed so that the exact cache weight is `target_weight`."""
    rng = np.random.default_rng(seed)
    query = rng.normal(size=DIM) / np.sqrt(DIM)
    fresh = rng.normal(size=(SLOTS, DIM))
    noise = rng.normal(size=SLOTS)
    # Stale embeddings whose scores are the fresh scores plus N(0, 1) noise.
    stale = fresh + noise[:, None] * query[None, :] / (query @ query)
    mass = np.exp(fresh @ query).sum()
    positive_score = np.log(mass * (1 - target_weight) / target_weight)
    positive = query * positive_score / (query @ query)
    return query, np.vstack([fresh, positive]), stale


def exact(query, fresh):
    """The fresh softmax over [positive, cache]: `(cache weight, loss, d loss / d query)`."""
    scores = fresh @ query
    z = np.exp(scores - scores.max())
    p = z / z.sum()
    loss = -np.log(p[SLOTS])
    gradient = p @ fresh - fresh[SLOTS]
    return 1.0 - p[SLOTS], loss, gradient


def measure(ks=(1, 2, 4, 16, 64), draws=20000, seed=0):
    """One row per k: the estimator's mean weight, loss and gradient against the exact."""
    tf = _tf()
    import tfnegcache

    query, fresh, stale = setup(seed)
    true_weight, true_loss, true_gradient = exact(query, fresh)
    spec = {"item_id": tf.TensorSpec([], tf.int64)}
    table = tf.Variable(fresh.astype(np.float32))
    rows = []
    for k in ks:
        cache = tfnegcache.NegativeCache(SLOTS, spec, DIM, seed=seed + k)
        ids = tf.range(SLOTS, dtype=tf.int64)
        cache.insert({"item_id": ids}, tf.constant(stale, tf.float32), ids)
        task = tfnegcache.CacheRetrieval(
            loss=tf.keras.losses.CategoricalCrossentropy(
                from_logits=True, reduction=tf.keras.losses.Reduction.NONE),
            cache=cache, candidate_model=lambda f: tf.gather(table, f["item_id"]),
            num_negatives=k, use_in_batch_negatives=False)
        queries = tf.Variable(np.repeat(query[None], draws, 0).astype(np.float32))
        positives = tf.fill([draws], tf.constant(SLOTS, tf.int64))
        with tf.GradientTape() as tape, tfnegcache.step.recording():
            loss = task(queries, tf.gather(table, positives), candidate_ids=positives,
                        candidate_features={"item_id": positives})
        gradient = tape.gradient(loss, queries).numpy().astype(np.float64)
        loss = loss.numpy().astype(np.float64)
        weight = -np.expm1(-loss)
        mean_gradient = gradient.mean(0)
        rows.append({
            "k": k, "weight": weight.mean(), "weight_se": weight.std() / np.sqrt(draws),
            "exact_weight": true_weight, "weight_bias": weight.mean() - true_weight,
            "loss": loss.mean(), "loss_se": loss.std() / np.sqrt(draws),
            "exact_loss": true_loss, "loss_bias": loss.mean() - true_loss,
            "gradient_error": float(np.linalg.norm(mean_gradient - true_gradient)
                                    / np.linalg.norm(true_gradient)),
            "gradient_se": float(np.linalg.norm(gradient.std(0)) / np.sqrt(draws)
                                 / np.linalg.norm(true_gradient)),
        })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 16, 64])
    args = parser.parse_args(argv)
    rows = measure(args.ks, args.draws, args.seed)
    print(f"{SLOTS} cached slots, stale score = fresh + N(0, 1), exact cache weight "
          f"{rows[0]['exact_weight']:.3f}, exact loss {rows[0]['exact_loss']:.3f}; "
          f"{args.draws} draws per k, seed {args.seed}")
    print("| k | mean cache weight | weight bias | loss bias (nats) | mean-gradient error |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['k']} | {r['weight']:.3f} ± {r['weight_se']:.3f} | {r['weight_bias']:+.3f} "
              f"| {r['loss_bias']:+.3f} ± {r['loss_se']:.3f} | {r['gradient_error']:.3f} "
              f"± {r['gradient_se']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
