"""Generated code: hostile programs are contained, recorded as failed, and leave no process, file or socket.

Each program runs through ``semalign.eval.execution.run_program`` (the path HumanEval/MBPP scoring takes).
``guard=False`` cases bypass the Python-level guard, so only the process-level containment is tested.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

from semalign.eval.execution import ExecLimits, run_program

LIMITS = ExecLimits(timeout_s=2.0, memory_mb=512)
TOKEN = "semalign-hostile-7c1e"

PROGRAMS = {
    "fork-bomb": ("import os\nwhile True:\n    os.fork()\n", True),
    "fork-bomb-unguarded": ("import posix\nwhile True:\n    posix.fork()\n", False),
    "memory-hog": ("x = bytearray(8 * 1024 ** 3)\n", True),
    "infinite-output": ("while True:\n    print('x' * 4096)\n", True),
    "sleep-past-timeout": ("import time\ntime.sleep(60)\n", True),
    "ignore-sigterm": ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                       "while True:\n    time.sleep(0.1)\n", True),
    "double-fork-daemon": ("import os, posix, time\nif posix.fork() == 0:\n    os.setsid()\n"
                           "    if posix.fork() == 0:\n        time.sleep(60)\n    os._exit(0)\nassert False\n", False),
    "popen-daemon-new-session": (f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', "
                                 f"'import time; time.sleep(60)  # {TOKEN}'], start_new_session=True)\nassert False\n",
                                 False),
    "write-outside": ("open('{victim}/owned.txt', 'w').write('x')\n", True),
    "write-outside-unguarded": ("open('{victim}/owned.txt', 'w').write('x')\n", False),
    "delete-files": ("import os\nos.remove('{victim}/keep.txt')\n", True),
    "delete-files-unguarded": ("import os\nos.remove('{victim}/keep.txt')\n", False),
    "read-parent-env": ("import os\nassert os.environ.get('RELIABILITY_SECRET') == 's3cret'\n", True),
    "read-parent-proc-environ": ("import os\nassert b's3cret' in open(f'/proc/{{os.getppid()}}/environ', 'rb').read()\n",
                                 False),
    "open-socket": ("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n", True),
    "open-socket-unguarded": ("import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n",
                              False),
    "listen-and-linger": ("import _socket, posix, time\ns = _socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n"
                          "if posix.fork() == 0:\n    time.sleep(60)\nassert False\n", False),
    "recursion-bomb": ("def f():\n    return f()\nf()\n", True),
    "deep-recursion-crash": ("import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1) + 1\nf(0)\n",
                             True),
    "os-exit-zero-early": ("import os\nos._exit(0)\nassert False\n", True),
    "sys-exit-zero-early": ("import sys\nsys.exit(0)\nassert False\n", True),
    "fake-success-output": ("print('passed')\nimport os\nos._exit(0)\n", True),
    "kill-parent-group": ("import os, signal\nfor pid in (0, os.getppid(), -1):\n    try:\n"
                          "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\nassert False\n", False),
    "thread-bomb": ("import threading, time\nts = [threading.Thread(target=time.sleep, args=(30,)) for _ in range(2000)]\n"
                    "[t.start() for t in ts]\n", True),
    "file-flood": ("i = 0\nwhile True:\n    open(f'f{{i}}', 'w').write('x' * 65536)\n    i += 1\n", True),
}


def _survivors(*needles: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in "ZX" and any(n.encode() in cmd for n in needles):
            out.append(int(d.name))
    return out


@pytest.fixture
def server():
    """A listening socket on the host: hostile programs must not reach it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    s.settimeout(0.2)
    yield s
    s.close()


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_hostile_program_is_contained(name, tmp_path, monkeypatch, server):
    src, guard = PROGRAMS[name]
    if not guard and os.geteuid() != 0:
        pytest.skip("unguarded hostile programs are only run where the sandbox can isolate them (root)")
    exec_root = tmp_path / "exec"
    exec_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(exec_root))  # every sandbox path then contains exec_root
    monkeypatch.setenv("RELIABILITY_SECRET", "s3cret")
    victim = tmp_path / "victim"
    victim.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(victim, 0o777)
    (victim / "keep.txt").write_text("keep")
    os.chmod(victim / "keep.txt", 0o666)
    program = src.format(victim=victim, port=server.getsockname()[1])

    t0 = time.monotonic()
    r = run_program(program, LIMITS, guard=guard)
    assert not r.passed and r.status in ("failed", "timeout"), r
    assert time.monotonic() - t0 < 20
    deadline = time.monotonic() + 5
    while _survivors(str(exec_root), TOKEN) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _survivors(str(exec_root), TOKEN) == []  # no process outlives the sandbox
    assert list(exec_root.iterdir()) == []  # its temp dir is gone
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"] and (victim / "keep.txt").read_text() == "keep"
    with pytest.raises(socket.timeout):
        server.accept()  # nobody connected to the host


def test_honest_program_still_passes(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r = run_program("import math, os\nopen('scratch.txt', 'w').write('ok')\nassert math.isclose(2 ** 0.5 ** 2, 2 ** 0.25)\n",
                    LIMITS)
    assert r.passed and r.status == "passed"
    assert list(tmp_path.iterdir()) == []
