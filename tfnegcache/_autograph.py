"""The library's TensorFlow code is written for graphs (`tf.cond`, `tf.while_loop` and Python
conditions on Python values only), so AutoGraph has nothing to convert in it. Left to itself,
`tf.function` converts every library function the user's step calls, source to source, the
first time a process traces it: several seconds of CPU before the first training step, more
than the rest of the trace (`setup_s` in `python -m benchmarks.ab_step_time`).

`leave_unconverted()`, called with the first use of a TF front-end name, adds a rule for the
`tfnegcache` modules to AutoGraph's conversion rules, as TensorFlow's own converter tests do:
the library's functions are then called as they are. The user's code that they call goes
through `as_user_code`, so it is still converted. AutoGraph keeps these rules in
a private module; if a TensorFlow release moves it, nothing breaks, and the library is
converted as before (slower to trace, the same graph).
"""

PREFIX = "tfnegcache"


def leave_unconverted() -> bool:
    """Adds `DoNotConvert("tfnegcache")` to AutoGraph's rules, once; True if it is there."""
    try:
        # pylint: disable-next=g-import-not-at-top
        from tensorflow.python.autograph.core import config, config_lib
    except ImportError:
        return False
    rules = getattr(config, "CONVERSION_RULES", None)
    if not isinstance(rules, tuple) or not hasattr(config_lib, "DoNotConvert"):
        return False
    if not any(isinstance(rule, config_lib.DoNotConvert) and
               getattr(rule, "_prefix", None) == PREFIX for rule in rules):
        config.CONVERSION_RULES = (config_lib.DoNotConvert(PREFIX),) + rules
    return True


def as_user_code(fn):
    """`fn` (the user's code, or another library's such as TFRS's) as converted code would
    call it: converted by AutoGraph when the enclosing `tf.function` converts, as it was
    before the library was left unconverted. Every call from the library into code that is not
    its own goes through this (towers, encoders, `compute_loss`, TFRS's retrieval task)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    autograph = getattr(getattr(tf, "__internal__", None), "autograph", None)
    if autograph is None:
        return fn
    return autograph.tf_convert(fn, autograph.control_status_ctx())
