"""Every public name's docstring example runs as pasted (doctest), with only `tfnegcache`,
`tf` and `np` imported."""

import doctest

import numpy as np
import pytest
import tensorflow as tf

import tfnegcache


@pytest.mark.parametrize("name", tfnegcache.__all__)
def test_the_docstring_example_runs(name):
    obj = getattr(tfnegcache, name)
    tests = doctest.DocTestFinder(recurse=False).find(
        obj, name, globs={"tfnegcache": tfnegcache, "tf": tf, "np": np})
    examples = [t for t in tests if t.examples]
    assert examples, f"{name} has no `>>>` example in its docstring"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in examples:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
