"""Running model-generated programs (HumanEval, MBPP): only with an explicit opt-in, one separate process each.

Layers of containment, none of which is a sandbox against a determined attacker:

* a fresh ``python -I`` process (isolated mode: no user site, no ``PYTHON*`` variables) in a fresh temporary
  directory as cwd, with a clean environment (no inherited tokens, keys or proxies), stdin from /dev/null;
* when running as root, the process drops to the ``nobody`` user (so it cannot write the user's files, and the
  process limit is enforced: Linux ignores ``RLIMIT_NPROC`` for root);
* ``resource.setrlimit`` in the child before ``exec``: CPU seconds, address space, processes, file size, open
  files, no core dumps (soft = hard, so the program cannot raise them again);
* a wall-clock timeout that kills the whole process group (``start_new_session``), and a kill of the group after
  every run to remove stragglers;
* a Python-level guard prepended to the program that disables process creation (``os.system``, ``fork``,
  ``subprocess``), signals, ``ctypes`` and writes, renames and deletions outside the temporary directory;
* a random sentinel printed after the last test: a program only passes when it exits 0 *and* reached the end,
  so ``sys.exit(0)`` or ``os._exit(0)`` before the asserts is a failure.

A program that escapes the process group (``setsid``) or abuses the kernel can still do harm: run untrusted
models' code in a container or VM. See docs/evaluation.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pwd
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import SemalignError

log = logging.getLogger(__name__)

RISK = ("scoring HumanEval/MBPP runs Python code written by the model on this machine; pass "
        "--allow-code-execution (Python: allow_code_execution=True) to accept that risk. Each program runs in a "
        "separate, resource-limited process with a timeout and no inherited secrets, but that is NOT a sandbox "
        "against a determined attacker: use a container or VM for untrusted models (docs/evaluation.md)")


def require_opt_in(allowed: bool, tasks: Sequence[str]) -> None:
    """Refuse (with the risk explained) unless code execution was explicitly allowed."""
    if not allowed:
        raise SemalignError(f"task(s) {', '.join(tasks)}: {RISK}")


@dataclass(frozen=True)
class ExecLimits:
    """Per-program limits. ``cpu_s`` defaults to the wall timeout rounded up plus one second."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    nproc: int = 16
    fsize_mb: int = 16
    nofile: int = 64
    cpu_s: int | None = None

    def cpu_seconds(self) -> int:
        return int(self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1)


@dataclass
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout
    returncode: int | None
    wall_s: float
    stdout_tail: str
    stderr_tail: str

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- the guard prepended to programs
GUARD = r'''
def __semalign_guard():
    import builtins, os, posix, shutil, subprocess, sys
    root = os.path.realpath(os.getcwd())

    def inside(p):
        if isinstance(p, int):
            return True
        try:
            p = os.fsdecode(p)
        except TypeError:
            return False
        full = os.path.realpath(os.path.join(root, p))
        return full == root or full.startswith(root + os.sep)

    def denied(name):
        def f(*args, **kwargs):
            raise PermissionError(f"{name} is disabled while evaluating generated code")
        return f

    def confined(name, fn, npaths):
        def f(*args, **kwargs):
            for p in args[:npaths]:
                if not inside(p):
                    raise PermissionError(f"{name} outside the working directory is disabled")
            return fn(*args, **kwargs)
        return f

    for mod in (os, posix):
        for name in ("system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "setsid", "setpgid",
                     "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "chroot", "chdir", "fchdir",
                     "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                     "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe",
                     "posix_spawn", "posix_spawnp", "putenv", "unsetenv", "register_at_fork"):
            if hasattr(mod, name):
                setattr(mod, name, denied(f"{mod.__name__}.{name}"))
        for name, n in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("removedirs", 1), ("rename", 2),
                        ("renames", 2), ("replace", 2), ("mkdir", 1), ("makedirs", 1), ("chmod", 1),
                        ("chown", 1), ("lchown", 1), ("link", 2), ("truncate", 1), ("utime", 1),
                        ("mkfifo", 1), ("mknod", 1)):
            fn = getattr(mod, name, None)
            if fn is not None:
                setattr(mod, name, confined(f"{mod.__name__}.{name}", fn, n))
        if hasattr(mod, "symlink"):
            mod.symlink = denied(f"{mod.__name__}.symlink")
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, denied(f"subprocess.{name}"))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, denied(f"shutil.{name}"))

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    os_open = os.open

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not inside(path):
            raise PermissionError("writing outside the working directory is disabled")
        return os_open(path, flags, *args, **kwargs)

    os.open = posix.open = guarded_os_open
    builtin_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in str(mode) for c in "wax+") and not inside(file):
            raise PermissionError("writing outside the working directory is disabled")
        return builtin_open(file, mode, *args, **kwargs)

    import io
    builtins.open = io.open = guarded_open
    import socket
    for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
        if hasattr(socket, name):
            setattr(socket, name, denied(f"socket.{name}"))
    for name in ("ctypes", "_ctypes", "multiprocessing", "_posixsubprocess", "pty", "_socket"):
        sys.modules[name] = None


__semalign_guard()
del __semalign_guard
__name__ = "__semalign_solution__"
'''


# --------------------------------------------------------------------------- interpreter / user selection
LAUNCHER = str(Path(__file__).with_name("sandbox_launcher.py"))
# Namespaces (PID, network, mount, IPC) when running as root; SEMALIGN_EXEC_ISOLATE=0 turns them off.
ISOLATE = os.environ.get("SEMALIGN_EXEC_ISOLATE", "1") != "0"
_RUNNER_LOCK = threading.Lock()
_RUNNER: tuple[str, tuple[int, int] | None] | None = None


def _world_executable(path: str) -> bool:
    """True when ``path`` (resolved) and every directory above it can be reached by any user."""
    try:
        real = Path(os.path.realpath(path))
        if not real.is_file() or not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    except OSError:
        return False


def _probe(python: str, user: tuple[int, int] | None) -> bool:
    kw: dict = {"user": user[0], "group": user[1], "extra_groups": []} if user else {}
    try:
        r = subprocess.run([python, "-I", "-c", "import os, posix, shutil, subprocess, io"], env=_clean_env("/"),
                           cwd="/", stdin=subprocess.DEVNULL, capture_output=True, timeout=30, **kw)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def runner() -> tuple[str, tuple[int, int] | None]:
    """(python interpreter, (uid, gid) to run as or None). Root drops to ``nobody`` when it can."""
    global _RUNNER
    with _RUNNER_LOCK:
        if _RUNNER is not None:
            return _RUNNER
        python, user = sys.executable, None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("nobody")
                cand_user: tuple[int, int] | None = (pw.pw_uid, pw.pw_gid)
            except KeyError:
                cand_user = None
            if cand_user is not None:
                cands = [sys.executable, getattr(sys, "_base_executable", ""), shutil.which("python3") or "",
                         f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}", "/usr/bin/python3"]
                for c in cands:
                    if c and _world_executable(c) and _probe(c, cand_user):
                        python, user = c, cand_user
                        break
            if user is None:
                log.warning("code execution runs as root: no interpreter reachable by the 'nobody' user was found, "
                            "so the process limit (RLIMIT_NPROC) is not enforced")
        _RUNNER = (python, user)
        log.info("generated code runs with %s%s", python, f" as uid {user[0]}" if user else "")
        return _RUNNER


def _clean_env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _limit_plan(limits: ExecLimits) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) for the program, never above the current hard limits."""
    mb = 1024 * 1024
    cpu = limits.cpu_seconds()
    wanted = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, limits.memory_mb * mb, limits.memory_mb * mb),
        (resource.RLIMIT_NPROC, limits.nproc, limits.nproc),
        (resource.RLIMIT_FSIZE, limits.fsize_mb * mb, limits.fsize_mb * mb),
        (resource.RLIMIT_NOFILE, limits.nofile, limits.nofile),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    plan = []
    for res, soft, hard in wanted:  # never ask for more than the current hard limit
        cur_hard = resource.getrlimit(res)[1]
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        plan.append((int(res), int(soft), int(hard)))
    return plan


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(program: str, limits: ExecLimits | None = None, *, guard: bool = True) -> ExecResult:
    """Run one Python program under the limits; it passes iff it exits 0 after its last statement."""
    limits = limits or ExecLimits()
    python, user = runner()
    nonce = secrets.token_hex(16)
    src = (GUARD if guard else "") + "\n" + program + f"\n\nprint('\\n{nonce}', flush=True)\n"
    outer = Path(tempfile.mkdtemp(prefix="semalign-exec-"))
    work = outer / "work"
    try:
        work.mkdir()
        os.chmod(outer, 0o711)  # traversable (not listable) by the unprivileged user
        prog = work / "program.py"
        prog.write_text(src, encoding="utf-8")
        if user:
            os.chown(work, *user)
            os.chown(prog, *user)
        spec = {"argv": [python, "-I", "-B", str(prog)], "env": _clean_env(str(work)), "work": str(work),
                "uid": user[0] if user else None, "gid": user[1] if user else None,
                "limits": _limit_plan(limits), "timeout": limits.timeout_s, "isolate": ISOLATE,
                "status": str(outer / "status.json")}
        t0 = time.monotonic()
        status = "failed"
        rc: int | None = None
        with open(outer / "stdout", "wb") as out, open(outer / "stderr", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", LAUNCHER, json.dumps(spec)], cwd=str(outer),
                                    env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    close_fds=True, start_new_session=True)
            try:
                proc.wait(timeout=limits.timeout_s + 15)  # the launcher enforces the timeout; this is a backstop
            except subprocess.TimeoutExpired:
                proc.terminate()  # the launcher kills the program (and its namespace) on SIGTERM
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                status = "timeout"
            finally:
                _kill_group(proc.pid)  # stragglers left in the group
        wall = time.monotonic() - t0
        try:
            rec = json.loads((outer / "status.json").read_text())
            rc = rec["returncode"]
            if rec["timeout"]:
                status, rc = "timeout", None
        except (OSError, ValueError, KeyError):
            rec = {}
        stdout, stderr = _tail(outer / "stdout"), _tail(outer / "stderr")
        if rc is not None and rc < 0 and -rc in (signal.SIGXCPU, signal.SIGKILL):
            status = "timeout"
        passed = rc == 0 and nonce in stdout
        if passed:
            status = "passed"
        return ExecResult(passed, status, rc, round(wall, 3), stdout.replace(nonce, "").strip()[-2000:],
                          stderr.strip()[-2000:])
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def run_programs(programs: Sequence[str], limits: ExecLimits | None = None, *, workers: int | None = None,
                 on_done: Callable[[], None] | None = None) -> list[ExecResult]:
    """Run programs concurrently (``workers`` defaults to the CPU count, at most 4); results in input order."""
    workers = max(1, workers or min(4, os.cpu_count() or 1))

    def one(p: str) -> ExecResult:
        r = run_program(p, limits)
        if on_done:
            on_done()
        return r

    if workers == 1 or len(programs) <= 1:
        return [one(p) for p in programs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, programs))
