"""The suite's Python subprocesses, forked from a process that has already imported
TensorFlow, instead of started fresh.

Each fresh Python process that loads TensorFlow spends about 5 CPU seconds importing it
before it does anything. The suite starts about 20 such processes of the same code: the
benchmarks' `--quick` runs, the `tf.distribute` scenarios, the command line's runs. A
*server*, started once per pytest process, imports `tfnegcache` (with TensorFlow, Keras 2 and
TFRS), numpy, scipy and matplotlib, and then forks one child per command. The child takes the
command's arguments, environment, working directory and output files, and runs the module or
script as `__main__`, as `python -m module` or `python script.py` would.

A forked child is a fresh process in every way the tests rely on:
- it has the command's arguments, environment (and nothing else), working directory,
  `sys.path`, standard streams (stdin empty) and exit status;
- TensorFlow's runtime is not started in the server, so the child sets up its devices,
  thread pools and distribution strategy itself, and `tf.config` calls that must come first
  still can;
- no module of this checkout besides `tfnegcache` is imported before the child runs (the
  benchmarks read their results directories from the environment when imported);
- the server forks from its only Python thread; TensorFlow's and JAX's two native threads
  wait on condition variables after the imports, holding no lock the child could need.
`tests/test_forkserver.py` checks the first three, each against a fresh process where it can.
Fresh processes remain where a test is about a fresh process: importing the library, serving
an export without it, Keras 3.

    run(args, cwd=..., env=..., timeout=...)  -> subprocess.CompletedProcess (text output)
    start(args, cwd=..., env=..., stdout=path, new_session=True) -> a Popen-like handle

`args` is `[sys.executable, "-m", module, ...]` or `[sys.executable, script, ...]`; anything
else, or `TFNEGCACHE_FRESH_PROCESSES=1` in the environment, starts a fresh process instead.
The CPU seconds of the children are added to `child_cpu()` when they are reaped
(`tests/cpu_report.py` counts them).
"""

import atexit
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_server = None          # (pid of the pytest process that started it, Popen, replies file)
_child_cpu = [0.0]


def child_cpu():
    """CPU seconds (user + system) of the forked children reaped so far in this process."""
    return _child_cpu[0]


# ------------------------------------------------------------------------------ server

def _preload():
    import tfnegcache  # pylint: disable=import-outside-toplevel
    tfnegcache.CacheRetrieval   # pylint: disable=pointless-statement  (TensorFlow, TFRS)
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import numpy  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import scipy.stats  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    from tensorflow.python.eager import context  # pylint: disable=import-outside-toplevel
    if context.context()._initialized:  # pylint: disable=protected-access
        raise RuntimeError("importing started TensorFlow's runtime: children cannot configure it")


def _exit_code(error):
    code = error.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _child(request, replies_fd, base_path):
    """Runs in the forked child: becomes the requested process, never returns. `base_path`:
    the server's `sys.path` without its first entry and its PYTHONPATH."""
    code = 1
    try:
        os.close(replies_fd)
        if request["new_session"]:
            os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        err = out if request["stderr"] is None else os.open(
            request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
        for fd in {null, out, err}:
            os.close(fd)
        # sys.path as the new interpreter would have it: its first entry, then PYTHONPATH,
        # then the installation's (without the server's own first entry and PYTHONPATH).
        args = request["args"]
        first = request["cwd"] if args[0] == "-m" else os.path.dirname(os.path.abspath(
            os.path.join(request["cwd"], args[0])))
        theirs = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [first] + theirs + base_path
        try:
            if args[0] == "-m":
                sys.argv = [args[1]] + args[2:]
                runpy.run_module(args[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(args)
                runpy.run_path(args[0], run_name="__main__")
            code = 0
        except SystemExit as error:
            code = _exit_code(error)
        except BaseException:  # pylint: disable=broad-except
            import traceback  # pylint: disable=import-outside-toplevel
            traceback.print_exc()
            code = 1
        try:
            atexit._run_exitfuncs()  # pylint: disable=protected-access
        except BaseException:  # pylint: disable=broad-except
            pass
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)  # pylint: disable=protected-access


def serve():
    """The server: requests on stdin, one JSON line each; a JSON line back for each on the
    file descriptor that was stdout (stdout itself then goes to stderr)."""
    replies_fd = os.dup(1)
    os.dup2(2, 1)
    replies = os.fdopen(replies_fd, "w", buffering=1)
    ours = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    base_path = [p for p in sys.path[1:] if os.path.abspath(p) not in ours]
    try:
        _preload()
    except BaseException as error:  # pylint: disable=broad-except
        replies.write(json.dumps({"ready": False, "error": repr(error)}) + "\n")
        return
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(request, replies_fd, base_path)
            replies.write(json.dumps({"pid": pid}) + "\n")
        elif request["op"] == "poll":
            try:
                pid, status, usage = os.wait4(request["pid"], os.WNOHANG)
            except ChildProcessError as error:
                replies.write(json.dumps({"error": repr(error)}) + "\n")
                continue
            if pid == 0:
                replies.write(json.dumps({"code": None}) + "\n")
            else:
                replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status),
                                          "cpu": usage.ru_utime + usage.ru_stime}) + "\n")


# ------------------------------------------------------------------------------ client

def _request(message):
    _, proc, replies = _server
    proc.stdin.write(json.dumps(message) + "\n")
    proc.stdin.flush()
    line = replies.readline()
    if not line:
        raise RuntimeError(f"the fork server ended (exit {proc.wait()})")
    return json.loads(line)


def _stop():
    if _server is not None and _server[0] == os.getpid() and _server[1] is not None:
        _server[1].stdin.close()
        try:
            _server[1].wait(timeout=10)
        except subprocess.TimeoutExpired:
            _server[1].kill()


def _ensure_server():
    """Starts this process's server (once); False if it cannot run here."""
    global _server  # pylint: disable=global-statement
    if os.environ.get("TFNEGCACHE_FRESH_PROCESSES") == "1":
        return False
    if _server is not None and _server[0] == os.getpid():
        return _server[1] is not None
    root = os.path.dirname(HERE)
    path = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve"], env=env,
                            cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    replies = proc.stdout
    ready = json.loads(replies.readline() or '{"ready": false}')
    if not ready.get("ready"):
        proc.kill()
        proc.wait()
        _server = (os.getpid(), None, None)
        return False
    _server = (os.getpid(), proc, replies)
    atexit.register(_stop)
    return True


def _servable(args):
    return (len(args) >= 2 and args[0] == sys.executable
            and (args[1] == "-m" and len(args) >= 3 or args[1].endswith(".py")))


class Forked:
    """A forked child, with the parts of `subprocess.Popen` the tests use."""

    def __init__(self, pid, args):
        self.pid, self.args, self.returncode = pid, args, None

    def poll(self):
        if self.returncode is None:
            reply = _request({"op": "poll", "pid": self.pid})
            if "error" in reply:
                raise RuntimeError(f"the fork server cannot wait for {self.pid}: {reply}")
            if reply["code"] is not None:
                self.returncode = reply["code"]
                _child_cpu[0] += reply["cpu"]
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(delay)
            delay = min(0.2, delay * 2)
        return self.returncode

    def kill(self):
        if self.returncode is None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass


def start(args, *, cwd, env, stdout, stderr=subprocess.STDOUT, new_session=False):
    """`args` (see the module's docstring) as a forked child writing to the file `stdout`
    (and `stderr`, or the same file); a `Forked`, or a `subprocess.Popen` when it cannot be
    forked."""
    global _server  # pylint: disable=global-statement
    args = [str(a) for a in args]
    if not (_servable(args) and _ensure_server()):
        return _fresh(args, cwd=cwd, env=env, stdout=stdout, stderr=stderr,
                      new_session=new_session)
    try:
        reply = _request({"op": "start", "args": args[1:], "cwd": str(cwd), "env": dict(env),
                          "stdout": str(stdout),
                          "stderr": None if stderr == subprocess.STDOUT else str(stderr),
                          "new_session": bool(new_session)})
    except (OSError, RuntimeError) as error:   # the server is gone: fresh processes from now
        print(f"tests/forkserver.py: {error!r}; starting fresh processes", file=sys.stderr)
        _server = (os.getpid(), None, None)
        return _fresh(args, cwd=cwd, env=env, stdout=stdout, stderr=stderr,
                      new_session=new_session)
    return Forked(reply["pid"], args)


def _fresh(args, *, cwd, env, stdout, stderr, new_session):
    with open(stdout, "ab") as out, open(
            stdout if stderr == subprocess.STDOUT else stderr, "ab") as err:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=err,
                                start_new_session=new_session)


def run(args, *, cwd, env=None, timeout=None):
    """`subprocess.run(args, capture_output=True, text=True, ...)` through a forked child:
    the finished process, its output as text; on timeout the child is killed and
    `subprocess.TimeoutExpired` raised."""
    env = dict(os.environ) if env is None else env
    with tempfile.TemporaryDirectory(prefix="forked") as directory:
        out, err = os.path.join(directory, "out"), os.path.join(directory, "err")
        proc = start(args, cwd=cwd, env=env, stdout=out, stderr=err)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        with open(out, encoding="utf-8", errors="replace") as f_out, \
                open(err, encoding="utf-8", errors="replace") as f_err:
            return subprocess.CompletedProcess(proc.args, code, f_out.read(), f_err.read())


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    serve()
