"""The cache under tf.distribute: MirroredStrategy on logical CPUs, MultiWorkerMirroredStrategy
with local worker processes. The scenarios run in subprocesses (tests/dist_scenarios.py),
since logical devices must be configured before TensorFlow initializes its devices: the
MirroredStrategy ones all in one process, the multi-worker ones in three runs of one pair of
workers, each shared by their tests. Every run is bounded in time, and the processes it
started are killed."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

import forkserver

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCENARIOS = os.path.join(HERE, "dist_scenarios.py")


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(extra)
    return env


def _start(args, log, **env):
    """A scenario process (forked, `tests/forkserver.py`) writing its output to `log`."""
    return forkserver.start([sys.executable, SCENARIOS, *args], env=_env(**env), cwd=ROOT,
                            stdout=log, new_session=True)


def _kill(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait(procs, timeout):
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            _kill(proc)
    return [proc.returncode for proc in procs]


# The MirroredStrategy scenarios, in one process (one TensorFlow start-up for the seven), with
# their arguments; sharded_exact goes last, since it turns on op determinism for the process.
MIRRORED = ("replicated_identical", "refresh_everything", "failed_step", "fit_recall:2",
            "sharded_save", "loss_scale_skip", "sharded_exact")


@pytest.fixture(scope="module", name="mirrored")
def fixture_mirrored(tmp_path_factory):
    """`(directory, exit code, log)` of the one run of every MIRRORED scenario."""
    directory = tmp_path_factory.mktemp("mirrored")
    log_path = directory / "log"
    (code,) = _wait([_start(["several", directory, *MIRRORED], log_path)], timeout=1500)
    return directory, code, log_path


def scenario_result(mirrored, name):
    """The JSON that scenario `name` of the shared run wrote; fails with its traceback, or
    with the run's log if it never finished."""
    directory, code, log_path = mirrored
    error = directory / f"{name}.error"
    assert not error.exists(), error.read_text()[-4000:]
    out = directory / f"{name}.json"
    assert out.exists(), f"{name} did not finish; exit {code}:\n{log_path.read_text()[-4000:]}"
    return json.loads(out.read_text())


def test_sharded_loss_draws_and_checkpoint_match_one_union_cache(mirrored):
    result = scenario_result(mirrored, "sharded_exact")
    # The loss (no in-batch negatives: with them each replica's softmax has only its own
    # batch's negatives) equals the one-device loss against a cache holding both shards.
    assert result["loss"] == pytest.approx(result["ref_loss"], rel=1e-5)
    # Draws over the union follow softmax(<q, e_j>) over the union: chi-square over 60 steps
    # x 64 queries x 4 draws, bins with expected count < 5 merged.
    counts, probs = np.array(result["counts"]), np.array(result["probs"])
    expected = probs * counts.sum()
    big = expected >= 5
    observed, expected = counts[big], expected[big]
    if not big.all():
        observed = np.append(observed, counts[~big].sum())
        expected = np.append(expected, (probs * counts.sum())[~big].sum())
    assert big.sum() >= 10
    p_value = stats.chisquare(observed, expected).pvalue
    assert p_value > 1e-3, p_value
    # Checkpoint keeps both (different) shards; the restored run continues identically.
    assert result["restored_equal"]
    assert result["shards_differ"]
    assert result["continued_equal"]


def test_replicated_copies_stay_identical_and_equal_one_device(mirrored):
    result = scenario_result(mirrored, "replicated_identical")
    for lr, runs in result.items():
        for name, copies in runs["dist"].items():
            copies = [np.array(c) for c in copies]
            assert len(copies) == 2
            np.testing.assert_array_equal(copies[0], copies[1], err_msg=f"lr={lr} {name}")
            single = np.array(runs["single"][name][0])
            if name.startswith("updated_at"):
                continue  # which slots were drawn (and written back) depends on the noise
            if name.startswith("embeddings") and lr != "0.0":
                continue  # the towers trained on other in-batch negatives and draws
            # With lr=0 every embedding is a fixed function of the features: exact.
            np.testing.assert_array_equal(copies[0], single, err_msg=f"lr={lr} {name}")


def test_random_refresh_under_mirrored_strategy_refreshes_every_copy_and_shard(mirrored):
    result = scenario_result(mirrored, "refresh_everything")
    assert result["replicated"]["copies"] == 2 and result["sharded"]["copies"] == 2
    for layout, found in result.items():
        assert found["checked"] >= 64, (layout, found)   # the filled slots of each copy
        assert max(found["max_error"]) < 1e-5, (layout, found)


def test_a_failed_step_under_mirrored_strategy_changes_nothing_in_either_layout(mirrored):
    result = scenario_result(mirrored, "failed_step")
    for layout, found in result.items():
        assert found["error"] and "has NaN or Inf" in found["error"], (layout, found["error"])
        assert found["num_state"] > 20, layout
        assert found["changed"] == [], (layout, found["changed"])


def test_fit_under_mirrored_strategy_reaches_single_device_recall(mirrored):
    result = scenario_result(mirrored, "fit_recall")
    single = result["single"]["recall"]
    # Tolerance 0.025. Measured recall@10 after 2 epochs: one device 0.750 (seed 0), and
    # 0.748 / 0.756 / 0.748 for seeds 1-3 (spread 0.009, sd ~0.004); 2 replicas: replicated
    # 0.749, sharded (2 x 256 slots) 0.743. Besides the seed noise (init, draws), a replica
    # has 64 in-batch negatives instead of 128, a small systematic change; 0.025 is ~6 sd of
    # the seed spread, and far below the cache's gain over in-batch training (~0.1).
    assert abs(result["replicated"]["recall"] - single) < 0.025, result
    assert abs(result["sharded"]["recall"] - single) < 0.025, result


# ---------------------------------------------------------------------------- multi-worker

def _free_ports(num):
    socks = [socket.socket() for _ in range(num)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _workers(directory, tag, backup, epochs, kill="none", layouts="replicated"):
    """Starts the pair of workers of run `tag`; worker 1 gets `kill` ("LAYOUT:EPOCH")."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        work = directory / f"{tag}-w{index}"
        work.mkdir()
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        # One inter-op thread: a worker waits in every step's collectives for the other, and
        # while it waits the idle threads of a larger inter-op pool spin, taking the CPU the
        # other worker (and the rest of the suite) needs (docs/tests.md).
        procs.append(_start(["worker", work / "out.json", backup, epochs,
                             kill if index == 1 else "none", layouts], work / "log",
                            TF_CONFIG=tf_config, TF_NUM_INTEROP_THREADS="1"))
    return procs


# The multi-worker runs, one after the other with one backup directory: each layout trains
# from scratch to the end once, and is killed once (worker 1 dies at the start of epoch 2,
# after the backup of epoch 1; worker 0 then blocks in a collective, so the whole job is
# stopped and restarted, as a cluster manager would) and resumed in the next run.
#   run 1: replicated from scratch to the end; sharded killed
#   run 2: sharded resumed; replicated (its backup gone with the finished run) killed
#   run 3: replicated resumed; sharded (its backup gone) from scratch to the end
MULTI_WORKER_RUNS = (("run1", "replicated,sharded", "sharded:2"),
                     ("run2", "sharded,replicated", "replicated:2"),
                     ("run3", "replicated,sharded", "none"))
EPOCHS = 4


@pytest.fixture(scope="module", name="multi_worker")
def fixture_multi_worker(tmp_path_factory):
    """`(directory, {run: [worker 0's exit code, worker 1's]})` of MULTI_WORKER_RUNS."""
    directory = tmp_path_factory.mktemp("multi_worker")
    codes = {}
    for tag, layouts, kill in MULTI_WORKER_RUNS:
        procs = _workers(directory, tag, directory / "backup", EPOCHS, kill, layouts)
        if kill != "none":
            deadline = time.monotonic() + 300
            while procs[1].poll() is None and time.monotonic() < deadline:
                time.sleep(1)
            codes[tag] = [procs[0].poll(), procs[1].poll()]
            _wait(procs, 1)
        else:
            codes[tag] = _wait(procs, 300)
    return directory, codes


def _logs(directory, tag):
    return [(directory / f"{tag}-w{i}" / "log").read_text()[-3000:] for i in (0, 1)]


def _results(multi_worker, tag, layout):
    """Both workers' results for `layout` in run `tag` (written when its fit returned); a
    run without a kill must have ended with exit code 0 on both workers."""
    directory, codes = multi_worker
    if dict((t, k) for t, _, k in MULTI_WORKER_RUNS)[tag] == "none":
        assert codes[tag] == [0, 0], _logs(directory, tag)
    out = []
    for index in (0, 1):
        path = directory / f"{tag}-w{index}" / "out.json"
        assert path.exists(), _logs(directory, tag)
        results = json.loads(path.read_text())
        assert layout in results, _logs(directory, tag)
        out.append(results[layout])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout,tag", [("replicated", "run1"), ("sharded", "run3")])
def test_multi_worker_fit_completes_with_the_same_loss_on_both_workers(multi_worker, layout,
                                                                      tag):
    results = _results(multi_worker, tag, layout)
    assert results[0]["epochs_run"] == EPOCHS, results
    assert len(results[0]["loss"]) == EPOCHS
    np.testing.assert_allclose(results[0]["loss"], results[1]["loss"], rtol=1e-6)
    # 12 global batches per epoch
    assert results[0]["cache_step"] == results[1]["cache_step"] == EPOCHS * 12
    # Replicated: the same cache on both workers; sharded: each worker its own shard.
    assert (results[0]["first_ids"] == results[1]["first_ids"]) == (layout == "replicated")


@pytest.mark.slow
@pytest.mark.parametrize("layout,killed,resumed", [("sharded", "run1", "run2"),
                                                   ("replicated", "run2", "run3")])
def test_multi_worker_resumes_from_backup_with_the_cache_after_a_worker_dies(
        multi_worker, layout, killed, resumed):
    directory, codes = multi_worker
    assert codes[killed][1] == 17, _logs(directory, killed)
    # Each worker's cache as backed up (replicated: the same on both; sharded: its own shard).
    backed_up = [np.load(directory / f"{killed}-w{i}" / layout / "epoch_end_1.npz")
                 for i in (0, 1)]
    assert not (directory / f"{killed}-w0" / layout / "epoch_end_2.npz").exists()
    results = _results(multi_worker, resumed, layout)
    # Resumed at epoch 2: only epochs 2 and 3 ran, and the cache continued from the backup.
    assert results[0]["epochs_run"] == results[1]["epochs_run"] == 2, results
    for index in (0, 1):
        restored = np.load(directory / f"{resumed}-w{index}" / layout / "train_begin.npz")
        for name in backed_up[index].files:
            np.testing.assert_array_equal(restored[name], backed_up[index][name],
                                          err_msg=f"worker {index} {name}")
    if layout == "sharded":   # the two shards differ, so each worker got its own back
        assert not np.array_equal(backed_up[0]["ids:0"], backed_up[1]["ids:0"])
    assert results[0]["cache_step"] == results[1]["cache_step"] == EPOCHS * 12
    np.testing.assert_allclose(results[0]["loss"], results[1]["loss"], rtol=1e-6)


def test_a_checkpoint_of_two_shards_is_refused_on_one_device(mirrored):
    # Written by 2 replicas; this process has one device, so one shard.
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    import tfnegcache  # pylint: disable=import-outside-toplevel
    import toy  # pylint: disable=import-outside-toplevel
    from test_transaction import full_state  # pylint: disable=import-outside-toplevel

    saved = scenario_result(mirrored, "sharded_save")
    assert min(saved["filled"]) > 0                 # both shards hold candidates
    model = toy.ToyModel(cache_size=None, use_in_batch_negatives=False)
    model.task.cache = tfnegcache.ShardedNegativeCache(64, toy.FEATURE_SPEC, 16)
    model.task.staleness = tf.keras.metrics.Mean(name="cache_staleness")
    model.compile(tf.keras.optimizers.Adam(0.05))
    model.fit(toy.dataset(toy.interactions(64, seed=1), 64), epochs=1, verbose=0)
    model(tf.constant([0], tf.int64))
    assert len(model.task.cache.shards) == 1
    before = full_state(model)
    for fmt, path in saved["paths"].items():
        with pytest.raises(ValueError, match=r"Cannot restore the cache 'negative_cache'.*saved "
                                             r"as \[sharded over 2 shards, size=64, .*\], but "
                                             r"the model's cache is \[sharded over 1 shard, "
                                             r"size=64, .*Nothing was restored"):
            model.load_weights(path)
        after = full_state(model)
        for name, value in before.items():
            np.testing.assert_array_equal(value, after[name], err_msg=f"{fmt}: {name}")


def test_a_step_the_loss_scale_skips_on_one_replica_changes_no_copy(mirrored):
    result = scenario_result(mirrored, "loss_scale_skip")
    for layout, found in result.items():
        assert found["num_state"] > 20, layout
        # Only the optimizer's step count moved; its scale halved (read after the next,
        # applied, step: halved, not grown).
        assert len(found["changed"]) == 2 and all("iteration" in k for k in found["changed"]), \
            (layout, found["changed"])
        assert found["scale"] == [2**10, 2**9], (layout, found["scale"])
        # 3 steps, a skipped one, then one more on every copy (replicated) or shard.
        assert found["steps_after_skip"] == [3, 3], (layout, found)
        assert found["steps_after_next"] == [4, 4], (layout, found)
