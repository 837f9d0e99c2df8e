"""Per-step learning rates of the SemAlign schedules (issue 9, defect 2)."""

import pytest
import torch

from semalign.training.loop import make_scheduler, warmup_steps


def lrs(kind: str, steps: int, lr: float = 3e-5) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = make_scheduler(opt, kind, steps, lr)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("steps", [2, 3, 4, 8])
def test_short_runs_get_the_peak_lr_on_every_step(steps):
    assert lrs("warmup_constant", steps) == pytest.approx([3e-5] * steps)


def test_long_runs_warm_up_then_stay_constant():
    got = lrs("warmup_constant", 32)
    w = warmup_steps(32)
    assert w == 3
    assert got[:w] == pytest.approx([3e-5 * (i + 1) / (w + 1) for i in range(w)])
    assert got[w:] == pytest.approx([3e-5] * (32 - w))
    assert min(got) >= 3e-5 / (w + 1)


@pytest.mark.parametrize("steps", [2, 4])
def test_onecycle_wastes_the_last_step_of_short_runs(steps):
    """Why OneCycle is no longer the default: its last step gets ~0 (2 steps at 3e-5: 2.4e-5 then ~1e-10)."""
    got = lrs("onecycle", steps)
    assert got[-1] < 1e-3 * max(got)
