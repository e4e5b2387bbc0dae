"""The Keras 3 front end's step on JAX against the TF front end's, and the cost of scoring.

    python -m benchmarks.keras3_step_time              # N in {2^16, 2^20}, B=256, d=64
    python -m benchmarks.keras3_step_time --quick      # N = 2^10: a smoke run

Every measurement runs in its own process (a Keras backend is fixed per process, and the TF
front end needs Keras 2), one after the other in the same run, so the numbers compare under
the same machine load (printed with them):

- `tf_step` / `tf_inbatch`: the TF front end's `CachedRetrievalModel.train_step` on the
  reference towers (`benchmarks.step_time`'s children: a 32-token bag over a 50k vocabulary,
  mean, Dense(128, relu), Dense(64) on both sides, cache-only softmax at T = 0.05, k = 1), with
  a full cache of N, and the same towers with in-batch negatives;
- `jax_step` / `jax_inbatch`: the same towers, data and cache in `tfnegcache.keras3` on JAX,
  the jitted `train_step` (its state donated, as `fit` runs it);
- `tf_matmul`: TensorFlow's oneDNN fp32 matmul `[B, d] x [d, N]`, the machine's best matmul
  of that shape; `tf_logmass`: the TF front end's tiled log-mass of the N slots;
- `jax_logmass`: the Keras 3 scorer's per-block log-masses (`keras3.scoring`) under
  `jax.jit`; `jax_matmul_tiles`: the same tiles with the exp and the sums replaced by a max
  (the matmul and one pass over each tile); `jax_matmul`: one `[B, N]` dot;
- `keras3_tf_logmass`: the Keras 3 scorer on the TensorFlow backend (why the TF front end
  keeps its own);
- `jax_index_update_ms`, `jax_cache_write_ms`: the sorted id index's update for a batch
  of B new ids, and a whole eager write of a step's rows (insert B, write back B);
- `jax_fusion`: from the compiled HLO of `jax_logmass`, the kernels of one tile: whether the
  masks, the exp and the sums are one fused loop after the dot.

The target: `jax_logmass` at 2^20 within 1.3x of `tf_matmul`.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

BATCH, DIM, QUERY_TOKENS = 256, 64, 32


def _median_ms(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


# ---------------------------------------------------------------------------------- JAX

def _keras3_towers(keras, name):
    """The reference tower in Keras 3: a token bag over 50k, mean, Dense(128, relu), Dense(64)."""
    inputs = keras.Input((None,), dtype="int32")
    tokens = keras.ops.mod(inputs, 50_000)
    bag = keras.ops.mean(keras.layers.Embedding(50_000, DIM)(tokens), axis=1)
    outputs = keras.layers.Dense(DIM)(keras.layers.Dense(128, activation="relu")(bag))
    return keras.Model(inputs, outputs, name=name)


def _keras3_model(num_slots, cache):
    import keras  # pylint: disable=import-outside-toplevel
    import tfnegcache.keras3 as k3  # pylint: disable=import-outside-toplevel

    class TwoTower(k3.CachedRetrievalModel):
        def __init__(self):
            super().__init__()
            keras.utils.set_random_seed(0)
            self.query_tower = _keras3_towers(keras, "query_tower")
            self.candidate_tower = _keras3_towers(keras, "candidate_tower")
            self.retrieval_loss = k3.CacheRetrieval(
                cache=(k3.NegativeCache(num_slots, {"candidate_tokens": ((32,), "int32")}, DIM)
                       if cache else None),
                candidate_model=lambda f: self.candidate_tower(f["candidate_tokens"]),
                temperature=0.05, use_in_batch_negatives=not cache)

        def call(self, x):
            return self.query_tower(x["query_tokens"])

        def compute_loss(self, x, y=None, y_pred=None, sample_weight=None, training=True):
            tokens = x["candidate_tokens"]
            kwargs = ({"candidate_ids": x["candidate_id"],
                       "candidate_features": {"candidate_tokens": tokens}} if cache else {})
            return self.retrieval_loss(y_pred, self.candidate_tower(tokens), **kwargs)

    model = TwoTower()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


def _jax_step(num_slots, repeats, cache):
    import jax  # pylint: disable=import-outside-toplevel
    from benchmarks import synthetic  # pylint: disable=import-outside-toplevel
    corpus = synthetic.make_corpus(num_candidates=max(num_slots, 256), seed=0,
                                   query_tokens=QUERY_TOKENS)
    data = corpus.queries(BATCH, split="train")
    batch = {"query_tokens": data["query_tokens"].astype(np.int32),
             "candidate_tokens": data["candidate_tokens"].astype(np.int32),
             "candidate_id": data["candidate_id"].astype(np.int32)}
    model = _keras3_model(num_slots, cache)
    model(batch)   # builds the towers
    model.optimizer.build(model.trainable_variables)
    out = {}
    if cache:
        store = model.retrieval_loss.cache
        chunk = min(num_slots, 2**12)
        start = time.perf_counter()
        for begin in range(0, num_slots, chunk):
            tokens = corpus.candidate_tokens[begin:begin + chunk].astype(np.int32)
            store.insert({"candidate_tokens": tokens}, model.candidate_tower(tokens),
                         corpus.candidate_ids[begin:begin + chunk].astype(np.int32))
        out["fill_s"] = time.perf_counter() - start
        out["cache_fill"] = float(store.fill_fraction())
    state = ([v.value for v in model.trainable_variables],
             [v.value for v in model.non_trainable_variables],
             [v.value for v in model.optimizer.variables],
             [v.value for v in model.metrics_variables])
    step = jax.jit(model.train_step, donate_argnums=0)
    start = time.perf_counter()
    logs, state = step(state, batch)
    jax.block_until_ready(logs)
    out["compile_s"] = time.perf_counter() - start
    holder = [state]

    def one():
        logs_, holder[0] = step(holder[0], batch)
        jax.block_until_ready(logs_)

    out["step_ms"] = _median_ms(one, repeats)
    out["skipped_steps"] = float(logs["skipped_steps"])
    return out


def _jax_scoring(num_slots, repeats):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from keras import ops  # pylint: disable=import-outside-toplevel
    from tfnegcache._plan import plan_sampler  # pylint: disable=import-outside-toplevel
    from tfnegcache.keras3 import _backend, scoring  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    queries = jnp.asarray(rng.normal(size=(BATCH, DIM)).astype(np.float32))
    embeddings = jnp.asarray(rng.normal(size=(num_slots + 1, DIM)).astype(np.float32))
    bias = jnp.zeros([num_slots], jnp.float32)
    plan = plan_sampler(num_slots, DIM, BATCH)

    @jax.jit
    def logmass(q, e, b):
        return scoring.block_log_masses(q, e, b, None, plan)

    @jax.jit
    def matmul_tiles(q, e, b):
        chunk = plan.chunk_size

        def one(i):
            tile = ops.einsum("bd,pd->bp", q, jax.lax.dynamic_slice(e, (i * chunk, 0),
                                                                    (chunk, DIM)))
            return [ops.max(tile + ops.expand_dims(
                jax.lax.dynamic_slice(b, (i * chunk,), (chunk,)), 0), axis=-1)]

        return _backend.map_chunks(one, num_slots // chunk, [((BATCH,), "float32")])[0]

    @jax.jit
    def matmul(q, e):
        return q @ e[:num_slots].T

    out = {"plan": {"block_size": plan.block_size, "chunk_size": plan.chunk_size,
                    "num_chunks": plan.num_chunks}}
    for name, fn in (("jax_logmass", lambda: logmass(queries, embeddings, bias)),
                     ("jax_matmul_tiles", lambda: matmul_tiles(queries, embeddings, bias)),
                     ("jax_matmul", lambda: matmul(queries, embeddings))):
        out[f"{name}_ms"] = _median_ms(lambda fn=fn: jax.block_until_ready(fn()), repeats)
    # The cache's bookkeeping per step: the id index's update for a batch of new ids (B
    # evicted, B inserted), and the whole write of a step (insert B, write back B) jitted.
    from tfnegcache.keras3 import index as id_index  # pylint: disable=import-outside-toplevel
    from tfnegcache.keras3.cache import NegativeCache  # pylint: disable=import-outside-toplevel
    from tfnegcache.keras3.store import CacheUpdate  # pylint: disable=import-outside-toplevel
    cached = jnp.arange(num_slots, dtype=jnp.int32) * 2
    slots = jnp.asarray(rng.permutation(num_slots).astype(np.int32))
    evicted = cached[:: max(1, num_slots // BATCH)][:BATCH]
    fresh = jnp.arange(BATCH, dtype=jnp.int32) * 2 + 1
    update = jax.jit(lambda i, s: id_index.update(i, s, evicted, jnp.ones([BATCH], bool), fresh,
                                                  slots[:BATCH], jnp.ones([BATCH], bool)))
    out["jax_index_update_ms"] = _median_ms(
        lambda: jax.block_until_ready(update(cached, slots)), repeats)
    cache = NegativeCache(num_slots, {"candidate_tokens": ((32,), "int32")}, DIM)
    tokens = rng.integers(0, 50_000, size=(BATCH, 32)).astype(np.int32)
    rows = rng.normal(size=(BATCH, DIM)).astype(np.float32)
    counter = [0]

    def write():
        ids = (np.arange(BATCH) + counter[0] * BATCH).astype(np.int32)
        counter[0] += 1
        cache.write(CacheUpdate({"candidate_tokens": tokens}, rows, ids,
                                write_back_slots=np.arange(BATCH, dtype=np.int32),
                                write_back_embeddings=rows,
                                write_back_valid=np.ones(BATCH, bool)), advance=True)

    out["jax_cache_write_ms"] = _median_ms(write, repeats, warmup=2)
    reference = jax.nn.logsumexp(matmul(queries, embeddings), axis=-1)
    masses = jax.nn.logsumexp(logmass(queries, embeddings, bias), axis=-1)
    out["max_abs_error"] = float(jnp.max(jnp.abs(masses - reference)))
    out["fusion"] = _fusion_report(logmass.lower(queries, embeddings, bias).compile().as_text())
    return out


def _fusion_report(hlo: str) -> dict:
    """The kernels of the tile loop's body in the compiled log-mass (the `while` body): each
    fusion with the ops it holds, and whether the exp and the block sums share a kernel (and
    whether the matmul does too)."""
    computations, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$", line)
        if header:
            name = header.group(1)
            computations[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            computations[name].append(line.strip())
    skip = {"parameter", "constant", "bitcast", "broadcast", "get-tuple-element", "tuple",
            "copy"}
    kernels = []
    for body in sorted(set(re.findall(r"body=%([\w.\-]+)", hlo))):
        for line in computations.get(body, []):
            op = re.search(r"= \S+ ([\w\-]+)\(", line)
            if not op or op.group(1) in skip:
                continue
            called = re.search(r"calls=%([\w.\-]+)", line)
            inside = set()
            for inner in computations.get(called.group(1), []) if called else []:
                found = re.search(r"= \S+ ([\w\-]+)\(", inner)
                if found and found.group(1) not in skip:
                    inside.add(found.group(1))
            kind = re.search(r"kind=(\w+)", line)
            kernels.append({"op": op.group(1), "kind": kind.group(1) if kind else None,
                            "ops": sorted(inside)})
    exp = [k for k in kernels if "exponential" in k["ops"]]
    return {
        "kernels": kernels,
        "exp_and_sum_in_one_kernel": bool(exp and "reduce" in exp[0]["ops"]),
        "matmul_in_that_kernel": bool(exp and "dot" in exp[0]["ops"]),
        "passes_over_the_tile_after_the_dot": sum(
            1 for k in kernels if "reduce" in k["ops"] or "exponential" in k["ops"]),
    }


def _keras3_tf_logmass(num_slots, repeats):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from tfnegcache._plan import plan_sampler  # pylint: disable=import-outside-toplevel
    from tfnegcache.keras3 import scoring  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    queries = tf.constant(rng.normal(size=(BATCH, DIM)).astype(np.float32))
    embeddings = tf.Variable(rng.normal(size=(num_slots + 1, DIM)).astype(np.float32))
    bias = tf.zeros([num_slots])
    plan = plan_sampler(num_slots, DIM, BATCH)
    fn = tf.function(lambda: scoring.block_log_masses(queries, embeddings, bias, None, plan))
    return {"keras3_tf_logmass_ms": _median_ms(lambda: fn().numpy(), repeats)}


# ---------------------------------------------------------------------------------- children

def _child(mode, num_slots, repeats):
    if mode in ("jax_step", "jax_inbatch", "jax_scoring"):
        os.environ["KERAS_BACKEND"] = "jax"
        import tfnegcache.keras3  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        if mode == "jax_scoring":
            return _jax_scoring(num_slots, repeats)
        return _jax_step(num_slots, repeats, cache=mode == "jax_step")
    if mode == "keras3_tf_logmass":
        os.environ["KERAS_BACKEND"] = "tensorflow"
        import tfnegcache.keras3  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        return _keras3_tf_logmass(num_slots, repeats)
    raise ValueError(mode)


def _run(command, env=None):
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("KERAS_BACKEND", "TF_USE_LEGACY_KERAS")}
    environment.update(env or {}, TF_CPP_MIN_LOG_LEVEL="2")
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False,
                          env=environment)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line][-3:]
        return {"error": errors or proc.stderr[-500:]}
    result = json.loads(lines[-1][len("RESULT "):])
    result["child_wall_s"] = time.perf_counter() - start
    result["load_average"] = os.getloadavg()
    return result


def _tf_front_end(mode, log2n, repeats):
    """`benchmarks.step_time`'s child: the TF front end (Keras 2) on the reference towers."""
    return _run([sys.executable, "-m", "benchmarks.step_time", "--child", mode, str(log2n),
                 "--batch", str(BATCH), "--dim", str(DIM), "--repeats", str(repeats),
                 "--towers", "reference"])


def _keras3(mode, log2n, repeats):
    return _run([sys.executable, "-m", "benchmarks.keras3_step_time", "--child", mode,
                 str(log2n), "--repeats", str(repeats)])


def _commit():
    """The commit measured, and whether the library or the benchmarks had changes on top."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                              check=False).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None,
                "uncommitted_changes": bool(git("status", "--porcelain", "--", ":/tfnegcache",
                                                ":/benchmarks"))}
    except OSError:
        return {"commit": None, "uncommitted_changes": None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--log2n", type=int, nargs="+", default=[16, 20])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "LOG2N"))
    args = parser.parse_args(argv)
    if args.child:
        result = _child(args.child[0], 2**int(args.child[1]), args.repeats)
        print("RESULT " + json.dumps(result), flush=True)
        return result
    if args.quick:
        args.log2n, args.repeats = [10], 2

    from benchmarks import _common  # pylint: disable=import-outside-toplevel
    rows = []
    for log2n in args.log2n:
        row = {"N": f"2^{log2n}", "load_before": os.getloadavg()[0]}
        parts = {
            "tf_step": _tf_front_end("cache", log2n, args.repeats),
            "jax_step": _keras3("jax_step", log2n, args.repeats),
            "tf_inbatch": _tf_front_end("inbatch", log2n, args.repeats),
            "jax_inbatch": _keras3("jax_inbatch", log2n, args.repeats),
            "tf_matmul": _tf_front_end("matmul", log2n, args.repeats),
            "tf_logmass": _tf_front_end("floor_tiled", log2n, args.repeats),
            "jax_scoring": _keras3("jax_scoring", log2n, args.repeats),
            "keras3_tf_logmass": _keras3("keras3_tf_logmass", log2n, args.repeats),
        }
        for name, result in parts.items():
            print(f"  N=2^{log2n} {name}: {result}", flush=True)
            if "error" in result:
                row[f"{name}_error"] = result["error"]
                continue
            if name == "jax_scoring":
                for key in ("jax_logmass_ms", "jax_matmul_tiles_ms", "jax_matmul_ms",
                            "max_abs_error", "jax_index_update_ms", "jax_cache_write_ms"):
                    row[key] = result[key]
                row["fusion"] = result["fusion"]
                row["plan"] = result["plan"]
            elif name == "keras3_tf_logmass":
                row[f"{name}_ms"] = result[f"{name}_ms"]
            else:
                row[f"{name}_ms"] = result["step_ms"]
                for key in ("compile_s", "fill_s"):
                    if key in result:
                        row[f"{name}_{key}"] = result[key]
        row["load_after"] = os.getloadavg()[0]
        if "jax_step_ms" in row and "tf_step_ms" in row:
            row["tf/jax step"] = row["tf_step_ms"] / row["jax_step_ms"]
        if "jax_logmass_ms" in row and "tf_matmul_ms" in row:
            row["jax_logmass/tf_matmul"] = row["jax_logmass_ms"] / row["tf_matmul_ms"]
        if "jax_logmass_ms" in row and "jax_matmul_tiles_ms" in row:
            row["exp+sum over tiles"] = row["jax_logmass_ms"] / row["jax_matmul_tiles_ms"]
        rows.append(row)
    targets = {}
    for row in rows:
        if row["N"] == "2^20" and "jax_logmass/tf_matmul" in row:
            targets["jax_logmass/tf_matmul at 2^20"] = row["jax_logmass/tf_matmul"]
            targets["logmass_within_1.3x_met"] = row["jax_logmass/tf_matmul"] <= 1.3
    path = _common.write_json("keras3_step_time", {"config": vars(args), "rows": rows,
                                                   "targets": targets, "code": _commit()})
    print(_common.table(rows, ["N", "tf_step_ms", "jax_step_ms", "tf/jax step",
                               "tf_inbatch_ms", "jax_inbatch_ms", "tf_matmul_ms",
                               "tf_logmass_ms", "jax_logmass_ms", "jax_matmul_tiles_ms",
                               "jax_matmul_ms", "keras3_tf_logmass_ms", "jax_index_update_ms",
                               "jax_cache_write_ms",
                               "jax_logmass/tf_matmul", "exp+sum over tiles", "load_before",
                               "load_after"]))
    for row in rows:
        print(f"N={row['N']} fusion: {row.get('fusion')}")
    print("targets:", targets)
    print("wrote", path)
    return rows


if __name__ == "__main__":
    main()
