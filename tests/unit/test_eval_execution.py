"""Generated-code execution: contained failures (loops, memory, forks, writes, os.system) and the opt-in."""

import os
import time
from pathlib import Path

import pytest

from semalign.errors import SemalignError
from semalign.eval.execution import ExecLimits, require_opt_in, run_program, run_programs


pytestmark = pytest.mark.usefixtures("one_thread")


FAST = ExecLimits(timeout_s=2.0, memory_mb=512)


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] in "ZX"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


def test_passing_and_failing_programs():
    ok = run_program("def f(x):\n    return x + 1\nassert f(1) == 2\n", FAST)
    assert ok.passed and ok.status == "passed" and ok.returncode == 0
    bad = run_program("assert 1 == 2\n", FAST)
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr_tail
    syntax = run_program("def f(:\n", FAST)
    assert not syntax.passed and "SyntaxError" in syntax.stderr_tail


def test_exit_zero_before_the_tests_is_a_failure():
    for early in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit\n"):
        r = run_program(early + "assert False\n", FAST)
        assert not r.passed, early


def test_main_block_is_not_run():
    r = run_program("if __name__ == '__main__':\n    raise SystemExit(3)\nassert True\n", FAST)
    assert r.passed


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = run_program("while True:\n    pass\n", ExecLimits(timeout_s=1.0))
    assert not r.passed and r.status == "timeout"
    assert time.monotonic() - t0 < 10


def test_memory_hog_is_contained():
    r = run_program("x = bytearray(8 * 1024 ** 3)\n", FAST)
    assert not r.passed and "MemoryError" in r.stderr_tail


def test_fork_bomb_is_blocked_by_the_guard():
    r = run_program("import os\nwhile True:\n    os.fork()\n", FAST)
    assert not r.passed and "disabled" in r.stderr_tail


def test_fork_bomb_is_contained_without_the_guard(tmp_path, monkeypatch):
    """Bypassing the Python guard, the process limit stops the forks and no child survives the run.

    (Pids printed by the program are namespace-local when the sandbox isolates, so survivors are found by the
    unique temp directory in their command line instead.)"""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    prog = ("import posix, time\npids = []\ntry:\n    for i in range(200):\n        pid = posix.fork()\n"
            "        if pid == 0:\n            time.sleep(60)\n            posix._exit(0)\n        pids.append(pid)\n"
            "finally:\n    print('PIDS', *pids, flush=True)\n")
    r = run_program(prog, FAST, guard=False)
    assert not r.passed
    assert "BlockingIOError" in r.stderr_tail or "Resource temporarily unavailable" in r.stderr_tail
    pids = [int(p) for line in r.stdout_tail.splitlines() if line.startswith("PIDS") for p in line.split()[1:]]
    assert len(pids) < 200

    def survivors():
        out = []
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and str(tmp_path).encode() in (d / "cmdline").read_bytes() and not _dead(int(d.name)):
                    out.append(d.name)
            except OSError:
                pass
        return out

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and survivors():
        time.sleep(0.1)
    assert not survivors()


def test_write_outside_the_temp_dir_is_refused(tmp_path: Path):
    target = tmp_path / "evil.txt"
    r = run_program(f"open({str(target)!r}, 'w').write('x')\n", FAST)
    assert not r.passed and not target.exists()
    r = run_program(f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n", FAST)
    assert not r.passed and not target.exists()
    r = run_program("import os\nos.remove('/etc/hostname')\n", FAST)
    assert not r.passed and os.path.exists("/etc/hostname")
    inside = run_program("open('ok.txt', 'w').write('x')\nassert open('ok.txt').read() == 'x'\n", FAST)
    assert inside.passed


def test_os_system_and_subprocess_are_refused(tmp_path: Path):
    marker = tmp_path / "marker"
    r = run_program(f"import os\nos.system('touch {marker}')\n", FAST)
    assert not r.passed and not marker.exists()
    r = run_program(f"import subprocess\nsubprocess.run(['touch', '{marker}'])\n", FAST)
    assert not r.passed and not marker.exists()


def test_clean_environment_and_fresh_cwd(monkeypatch):
    monkeypatch.setenv("SEMALIGN_TEST_SECRET", "hunter2")
    prog = ("import os\nassert 'SEMALIGN_TEST_SECRET' not in os.environ\n"
            "assert sorted(os.listdir('.')) == ['program.py'], os.listdir('.')\n")
    assert run_program(prog, FAST).passed


def test_run_programs_keeps_order():
    progs = ["assert True\n", "assert False\n", "x = 1\n"]
    assert [r.passed for r in run_programs(progs, FAST, workers=2)] == [True, False, True]


def test_refusal_without_opt_in():
    with pytest.raises(SemalignError, match="--allow-code-execution"):
        require_opt_in(False, ["humaneval"])
    require_opt_in(True, ["humaneval"])


def test_evaluate_refuses_code_tasks_without_the_flag():
    from semalign.eval import evaluate
    from semalign.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    with pytest.raises(SemalignError, match="not a sandbox|NOT a sandbox"):
        evaluate(tiny_model(tokenizer=tok), tok, ["mbpp"], progress=False)
