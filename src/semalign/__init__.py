"""semalign: cross-scale knowledge transfer between language models.

SemAlign (arXiv 2510.24208) moves task knowledge through activations: teacher layer outputs are mapped into
the student's space via vocabulary-defined semantic bases and the paired student layers are trained to match.
Parametric baselines (Seeking, LaTen) and controls (LoRA SFT, logit KD) share the same interface.

Public API::

    from semalign import RunConfig, run_transfer
    summary = run_transfer(RunConfig(teacher=..., student=..., task="mmlu"))
"""

from .config import RunConfig, load_config, make_config
from .errors import SemalignError

__version__ = "0.1.0"


def run_transfer(cfg, **kwargs):
    """Run a transfer (see :func:`semalign.transfer.run_transfer`)."""
    from .transfer import run_transfer as _run

    return _run(cfg, **kwargs)


__all__ = ["RunConfig", "SemalignError", "load_config", "make_config", "run_transfer", "__version__"]
