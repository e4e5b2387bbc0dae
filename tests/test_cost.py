"""`tfnegcache.measure_cost` and `python -m tfnegcache cost`: what a user runs to see whether
the cache can pay for their model on their hardware."""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs

import tfnegcache
import cost_target
import forkserver
import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))


def everything(model):
    state = {v.name + str(i): v.numpy() for i, v in enumerate(model.variables)}
    state.update({"optimizer/" + v.name + str(i): v.numpy()
                  for i, v in enumerate(model.optimizer.variables())})
    return state


def assert_same(before, after):
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def test_the_report_is_consistent_and_the_model_is_left_as_it_was():
    model, batch = cost_target.make()
    model.fit(toy.dataset(toy.interactions(256, seed=1), 128), epochs=1, verbose=0)
    before = everything(model)
    ids = tf.constant(np.arange(toy.NUM_ITEMS + 3), tf.int64)
    index = model.task.cache.lookup(ids).numpy()
    report = tfnegcache.measure_cost(model, batch, steps=3, warmup=1)
    assert_same(before, everything(model))
    np.testing.assert_array_equal(index, model.task.cache.lookup(ids).numpy())
    assert report.batch_size == 128 and report.cache_slots == 256
    assert min(report.cache_step_ms, report.in_batch_step_ms, report.scoring_ms) > 0
    assert report.rho == report.in_batch_step_ms / report.scoring_ms
    assert report.overhead == report.cache_step_ms / report.in_batch_step_ms
    assert report.break_even_step_ratio == pytest.approx(1 / report.overhead)
    text = str(report)
    assert f"rho = {report.rho:.3g}" in text and f"overhead = {report.overhead:.3g}x" in text


def test_a_model_never_trained_is_built_and_left_as_built():
    model, batch = cost_target.make()
    tfnegcache.measure_cost(model, batch, steps=1, warmup=0)
    assert int(model.optimizer.iterations.numpy()) == 0
    assert int(model.task.cache.step.numpy()) == 0
    history = model.fit(toy.dataset(toy.interactions(256, seed=1), 128), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


def test_in_batch_only_steps_are_tfrs_retrieval_and_leave_the_cache_alone():
    model, batch = cost_target.make()
    queries = model.query_tower(batch["user_id"])
    candidates = model.candidate_tower({"item_id": batch["item_id"],
                                        "tokens": batch["tokens"]})
    expected = tfrs.tasks.Retrieval()(queries, candidates, candidate_ids=batch["item_id"],
                                      compute_metrics=False)
    before = {v.name: v.numpy() for v in model.task.cache.weights}
    with tfnegcache.step.in_batch_only(), tfnegcache.step.recording() as record:
        got = model.task(queries, candidates, candidate_ids=batch["item_id"],
                         candidate_features={"item_id": batch["item_id"],
                                             "tokens": batch["tokens"]}, compute_metrics=False)
    assert record.updates == []
    assert got.numpy() == expected.numpy()
    assert_same(before, {v.name: v.numpy() for v in model.task.cache.weights})


@pytest.mark.parametrize("make,message", [
    (lambda: (tfrs.Model(), {}), r"must be a tfnegcache.CachedRetrievalModel. Received: Model"),
    (lambda: (toy.ToyModel(cache_size=64), {}), r"must be compiled first"),
    (lambda: (_compiled(toy.ToyModel()), {}), r"has no CacheRetrieval task with a cache"),
    (lambda: (_compiled(toy.ToyModel(cache_size=64)), [1, 2]),
     r"`batch` must be one training batch, a dict of tensors.*Received: list"),
])
def test_bad_input_is_refused_and_changes_nothing(make, message):
    model, batch = make()
    before = {v.name + str(i): v.numpy() for i, v in enumerate(model.variables)}
    with pytest.raises(ValueError, match=message):
        tfnegcache.measure_cost(model, batch)
    assert_same(before, {v.name + str(i): v.numpy() for i, v in enumerate(model.variables)})


def test_bad_step_counts_are_refused():
    model, batch = cost_target.make()
    with pytest.raises(ValueError, match=r"`steps` must be an integer >= 1. Received: steps=0"):
        tfnegcache.measure_cost(model, batch, steps=0)


def _compiled(model):
    model.compile(tf.keras.optimizers.Adam(0.05))
    return model


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
    return forkserver.run([sys.executable, "-m", "tfnegcache", "cost", *args], cwd=HERE,
                          env=env, timeout=300)


def test_the_command_prints_the_report_and_refuses_bad_targets():
    out = _cli("cost_target:make", "--steps", "2", "--warmup", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "batch 128, cache of 256 slots" in out.stdout and "rho = " in out.stdout
    for args, message in ((["nonsense"], "MODULE:FUNCTION must name a function"),
                          (["cost_target:make", "--steps", "0"], "--steps must be an integer >= 1"),
                          (["no_such_module:make"], "cannot import 'no_such_module'"),
                          (["cost_bad:nothing"], "has no function 'nothing'"),
                          (["cost_bad:not_a_pair"], "must return (model, batch)")):
        out = _cli(*args)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr[-2000:])


def test_the_report_states_rho_the_break_even_and_the_measured_crossover():
    from tfnegcache import cost  # pylint: disable=import-outside-toplevel
    report = cost.CostReport(cache_step_ms=150.0, in_batch_step_ms=100.0, scoring_ms=20.0,
                             batch_size=64, cache_slots=4096)
    assert report.rho == 5.0 and report.overhead == 1.5
    assert report.break_even_step_ratio == pytest.approx(2 / 3)
    text = str(report)
    assert "rho = 5 " in text and "under 67% of the steps" in text
    assert "one seed (benchmarks.rho_map, docs/rho_map.md): dense 11.7, rec 2.2" in text
