"""Run ``python -c CODE ...`` / ``python -m MODULE ...`` in a fresh interpreter, without paying torch's import each time.

A test that needs a fresh interpreter (what ``import kdpp`` imports, a command's exit status, an optional package
blocked before anything imports it) would start one with ``subprocess.run([sys.executable, ...])``; about a second
of that is ``import torch``. Here one server process imports torch once and forks a child per run: the child is a
fresh interpreter with torch (and what torch imports) already loaded, nothing of kdpp, of the test session or of the
packages the tests look for. Off Linux (no ``os.fork`` on Windows; forking a process that imported torch is unsafe
on macOS) every run is a plain subprocess.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVER = r"""
import atexit, json, os, runpy, sys, traceback
import torch  # the start-up cost every child shares

def run(request):
    os.chdir(request["cwd"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdin = open(0, closefd=False)
    mode, target, *argv = request["args"]
    try:
        if mode == "-c":
            sys.argv = ["-c", *argv]
            exec(compile(target, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = [target, *argv]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as e:  # as the interpreter maps it
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()  # what the child registered, as at an interpreter's exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        run(request)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


class FreshPython:
    """``run(["-c", code, *argv])`` or ``run(["-m", module, *argv])``: a ``subprocess.CompletedProcess`` with the
    exit status and the captured text of stdout and stderr, as ``subprocess.run(..., capture_output=True,
    text=True)`` gives (kdpp importable from this checkout)."""

    def __init__(self):
        self.server, self.log = None, None

    def run(self, args: list[str], cwd: Path | str = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
        if args[0] not in ("-c", "-m") or len(args) < 2:
            raise ValueError(f"args must start with '-c', CODE or '-m', MODULE; got {args!r}")
        if sys.platform != "linux":
            return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                                  timeout=timeout)
        if self.server is None:
            self.log = tempfile.TemporaryFile("w+")
            self.server = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, env=_env(), text=True,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                           start_new_session=True)
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"args": [str(a) for a in args], "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
            self.server.stdin.write(json.dumps(request) + "\n")
            self.server.stdin.flush()
            if not select.select([self.server.stdout], [], [], timeout)[0]:
                self.close(kill=True)
                raise subprocess.TimeoutExpired([sys.executable, *args], timeout)
            line = self.server.stdout.readline()
            if not line:
                self.log.seek(0)
                log = self.log.read()[-3000:]
                self.close(kill=True)
                raise RuntimeError(f"the fresh-interpreter server exited:\n{log}")
            return subprocess.CompletedProcess([sys.executable, *args], json.loads(line), out.read_text(),
                                               err.read_text())

    def close(self, kill: bool = False) -> None:
        if self.server is None:
            return
        if kill:
            os.killpg(self.server.pid, signal.SIGKILL)
        try:
            self.server.stdin.close()
        except BrokenPipeError:
            pass
        self.server.wait()
        self.server.stdout.close()
        self.log.close()
        self.server, self.log = None, None
