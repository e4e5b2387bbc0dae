"""`tests/forkserver.py`: a forked child is the process the command would have started, with
TensorFlow's runtime not yet started, and the fork server's failures are the caller's."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

import forkserver

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _script(tmp_path, text, name="script.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


REPORT = """
    import json, os, sys
    sys.stdout.write(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path": sys.path,
                                 "env": dict(os.environ), "stdin": sys.stdin.read(),
                                 "pid": os.getpid(), "pgid": os.getpgid(0),
                                 "benchmarks": sorted(m for m in sys.modules
                                                      if m.split(".")[0] == "benchmarks")}))
    print("to stderr", file=sys.stderr)
    sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("fresh", [False, True])
def test_a_script_gets_its_arguments_directory_environment_and_exit_code(tmp_path, fresh,
                                                                         monkeypatch):
    script = _script(tmp_path, REPORT)
    env = {"ONLY": "this", "PYTHONPATH": os.pathsep.join(["/nowhere/a", "/nowhere/b"])}
    if fresh:   # the same command, started fresh: what the forked child must match
        env["TFNEGCACHE_FRESH_PROCESSES"] = "1"
        monkeypatch.setenv("TFNEGCACHE_FRESH_PROCESSES", "1")
    result = forkserver.run([sys.executable, script, "7"], cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 7
    assert result.stderr == "to stderr\n"
    seen = json.loads(result.stdout)
    assert seen["argv"] == [script, "7"]
    assert seen["cwd"] == str(tmp_path)
    # The environment given, and nothing else (a fresh interpreter may add LC_CTYPE).
    assert {k: v for k, v in seen["env"].items() if k != "LC_CTYPE"} == env
    assert seen["path"][:3] == [str(tmp_path), "/nowhere/a", "/nowhere/b"]
    assert HERE not in seen["path"] and ROOT not in seen["path"][3:]
    assert seen["stdin"] == ""
    assert seen["benchmarks"] == []          # nothing of this checkout's but tfnegcache


def test_a_module_runs_as_main_and_an_exception_exits_1_with_its_traceback(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tool.py").write_text(
        "import sys\nprint(__name__, sys.argv)\nraise KeyError('boom')\n")
    result = forkserver.run([sys.executable, "-m", "pkg.tool", "a", "b"], cwd=tmp_path,
                            env={}, timeout=120)
    assert result.returncode == 1
    assert result.stdout == f"__main__ {[str(package / 'tool.py'), 'a', 'b']}\n"
    assert result.stderr.rstrip().endswith("KeyError: 'boom'")


def test_tensorflow_is_loaded_with_keras_2_and_its_runtime_is_the_childs_to_configure(tmp_path):
    script = _script(tmp_path, """
        import json, sys
        import tensorflow as tf
        loaded = "tfnegcache" in sys.modules and "tf_keras" in sys.modules
        tf.config.threading.set_intra_op_parallelism_threads(1)   # fails once started
        cpu, = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        print(json.dumps({"loaded": loaded, "keras": tf.keras.__name__,
                          "logical": len(tf.config.list_logical_devices("CPU")),
                          "threads": tf.config.threading.get_intra_op_parallelism_threads(),
                          "sum": float(tf.reduce_sum(tf.ones([3])))}))
    """)
    result = forkserver.run([sys.executable, script], cwd=tmp_path, env=dict(os.environ),
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen == {"loaded": True, "keras": "tf_keras.api._v2.keras", "logical": 2,
                    "threads": 1, "sum": 3.0}


def test_a_child_past_its_timeout_is_killed_and_its_cpu_is_counted(tmp_path):
    busy = _script(tmp_path, """
        import time
        end = time.process_time() + 0.5
        while time.process_time() < end:
            pass
    """, "busy.py")
    before = forkserver.child_cpu()
    assert forkserver.run([sys.executable, busy], cwd=tmp_path, env={}, timeout=60)\
        .returncode == 0
    assert 0.5 <= forkserver.child_cpu() - before < 5
    sleeper = _script(tmp_path, "import time\ntime.sleep(60)\n", "sleeper.py")
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        forkserver.run([sys.executable, sleeper], cwd=tmp_path, env={}, timeout=1)
    assert time.monotonic() - start < 30


def test_a_new_session_leads_its_own_process_group(tmp_path):
    script = _script(tmp_path, REPORT)
    log = tmp_path / "log"
    proc = forkserver.start([sys.executable, script, "0"], cwd=tmp_path, env={}, stdout=log,
                            new_session=True)
    assert isinstance(proc, forkserver.Forked)
    assert proc.wait(timeout=120) == 0
    text = log.read_text()
    seen = json.loads(text[:text.rindex("}") + 1])
    assert seen["pid"] == seen["pgid"] == proc.pid
    assert text.endswith("to stderr\n")      # stderr into the same file


def test_when_the_server_is_gone_commands_start_fresh(tmp_path, capfd, monkeypatch):
    assert forkserver._ensure_server()  # pylint: disable=protected-access
    gone = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    gone.wait()
    # The server as it is after it died (this process's live server comes back afterwards).
    monkeypatch.setattr(forkserver, "_server", (os.getpid(), gone, gone.stdout))
    result = forkserver.run([sys.executable, _script(tmp_path, REPORT), "3"], cwd=tmp_path,
                            env={"A": "b"}, timeout=120)
    assert forkserver._server[1] is None  # pylint: disable=protected-access
    assert "starting fresh processes" in capfd.readouterr().err
    assert result.returncode == 3 and result.stderr == "to stderr\n"
    assert json.loads(result.stdout)["argv"][1:] == ["3"]
