"""The method interface shared by SemAlign and the baselines: prepare -> fit -> export.

A method is a class registered in :data:`METHODS` with a ``name``, a ``paper`` reference and three steps that
read and write through a :class:`TransferContext`. The driver (``semalign.transfer``) owns loading, splits,
the run directory, evaluation and reports; methods own only their algorithm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..artifacts import RunDir
from ..config import RunConfig
from ..data.tasks import Splits, TaskSpec
from ..models.arch import Internals
from ..registry import Registry

log = logging.getLogger(__name__)


@dataclass
class TransferContext:
    config: RunConfig
    teacher: torch.nn.Module
    student: torch.nn.Module
    tokenizer: Any
    t_arch: Internals
    s_arch: Internals
    splits: Splits
    task: TaskSpec
    run: RunDir
    device: torch.device
    resume: bool = False
    teacher_tokenizer: Any = None
    state: dict[str, Any] = field(default_factory=dict)  # method-private scratch space
    summary: dict[str, Any] = field(default_factory=dict)  # merged into summary.json

    @property
    def steps(self) -> int:
        return self.config.steps or self.task.table4_steps


class TransferMethod:
    """Base class: subclasses set ``name``/``paper``/``summary_line`` and implement the three steps."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary_line: ClassVar[str] = ""
    needs_teacher_forward: ClassVar[bool] = True
    # True: the driver loads the student with fp32 weights. False: the student is loaded in --dtype and the
    # method upcasts only what it trains (SemAlign: the paired layers), which keeps frozen compute in bf16.
    student_fp32: ClassVar[bool] = True

    def prepare(self, ctx: TransferContext) -> None:
        """Attribution / extraction / pairing / precomputation. Writes its artefacts to the run dir."""

    def fit(self, ctx: TransferContext) -> None:  # pragma: no cover - abstract
        """Train or inject; logs per-step metrics with ``ctx.run.log_metrics``."""
        raise NotImplementedError

    def export(self, ctx: TransferContext) -> Path:
        """Write the transferred student as a merged HF checkpoint in ``ctx.run.student_dir``."""
        from ..models.export import export_student

        return export_student(ctx.student, ctx.tokenizer, ctx.run.student_dir, card=self.model_card(ctx))

    def model_card(self, ctx: TransferContext) -> str:
        c = ctx.config
        return (f"# {ctx.run.root.name}\n\nStudent produced by `semalign` method **{self.name}** "
                f"({self.paper}).\n\n- teacher: `{c.teacher}`\n- student: `{c.student}`\n- task: `{c.task}`\n"
                f"- seed: {c.seed}\n\nLoad with `AutoModelForCausalLM.from_pretrained(this_dir)`.\n")


METHODS: Registry[type[TransferMethod]] = Registry("method")


def get_method(name: str) -> TransferMethod:
    _load_builtin_methods()
    return METHODS.get(name)()


def _load_builtin_methods() -> None:
    """Import method modules so they register themselves (idempotent)."""
    import importlib

    for mod in ("semalign.methods.semalign.recipe", "semalign.methods.semalign.frontier",
                "semalign.methods.seeking", "semalign.methods.laten", "semalign.methods.controls"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(mod.rsplit(".", 1)[0]) and exc.name == mod:
                continue  # method not installed in this build
            raise
