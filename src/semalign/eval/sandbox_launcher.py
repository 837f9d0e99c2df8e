"""Launcher that runs one generated program contained (started as ``python -I -S sandbox_launcher.py SPEC``).

Standalone on purpose (imports only the standard library, never ``semalign``): it runs as a fresh,
single-threaded process, so it can change namespaces, mounts and credentials safely before ``exec``.

SPEC (JSON): ``argv``, ``env``, ``work`` (the program's directory), ``uid``/``gid`` (or null), ``limits``
([resource, soft, hard] triples), ``timeout`` seconds, ``isolate`` (try namespaces), ``status`` (file to write).

When it may (root, kernel permits), the launcher ``unshare``s new PID, network, mount and IPC namespaces and
forks the program as PID 1 of the new PID namespace: when that process ends or is killed, the kernel kills every
process left in the namespace (daemons, ``setsid`` escapees, forks). The program also sees no network (only a
down loopback), a private ``/proc``, and empty private tmpfs on ``/tmp``, ``/var/tmp`` and ``/dev/shm`` (its own
working directory is bind-mounted back in). Otherwise the launcher is a child subreaper: orphans of the program
are re-parented to it and killed when the program ends. Either way it enforces the wall-clock timeout itself and
gives the program ``PR_SET_PDEATHSIG = SIGKILL``, so killing the launcher kills the program.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


def _children(pid):
    """PIDs whose parent is ``pid`` (from /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(name))
    return out


def _reap_all(me):
    """Kill and reap every remaining descendant re-parented to this subreaper."""
    for _ in range(200):
        kids = _children(me)
        if not kids:
            return
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.01)


def _isolate_child(libc, spec):
    """In the new namespaces: private mounts, fresh /proc and tmpfs, the work dir bound back in."""
    work = spec["work"]
    if libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None)
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d) and not os.path.islink(d):
            libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64m,mode=1777")
    if not os.path.isdir(work):  # hidden under a fresh tmpfs: bind the original directory back in place
        os.makedirs(work, exist_ok=True)
        if libc.mount(f"/proc/self/fd/{fd}".encode(), work.encode(), None, MS_BIND, None) != 0:
            os.fchdir(fd)
            os.close(fd)
            return
    os.chdir(work)
    os.close(fd)


def main():
    spec = json.loads(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    isolated = False
    if spec.get("isolate") and os.geteuid() == 0:
        isolated = libc.unshare(CLONE_NEWPID) == 0  # the program's own namespaces are made after the fork
    if not isolated:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    me = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            if isolated:
                _isolate_child(libc, spec)
            else:
                os.chdir(spec["work"])
            if spec.get("uid") is not None:
                os.setgroups([])
                os.setgid(spec["gid"])
                os.setuid(spec["uid"])
            for res, soft, hard in spec["limits"]:
                resource.setrlimit(res, (soft, hard))
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if not isolated and os.getppid() != me:
                os._exit(125)
            os.execve(spec["argv"][0], spec["argv"], spec["env"])
        except BaseException:  # noqa: BLE001 - never return into the launcher's code
            os._exit(126)

    def stop(signum, frame):  # the caller gave up: take the program (and its namespace) down with us
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        if not isolated:
            _reap_all(me)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    deadline = time.monotonic() + float(spec["timeout"])
    timed_out, status = False, 0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() >= deadline:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            status = os.waitpid(pid, 0)[1]
            break
        time.sleep(0.005)
    if not isolated:
        _reap_all(me)
    rec = {"timeout": timed_out, "isolated": isolated,
           "returncode": os.waitstatus_to_exitcode(status)}
    with open(spec["status"], "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main()
