"""Named stages with timing, logging and caching handled once, so a driver reads as the list of stages it runs.

::

    stages = Stages(cache=stage_cache(cfg.cache))
    with stages("load_models"):
        teacher, student = ...
    nll_t = stages.cached("nll", NLL_VERSION, {"model": t_hash, "examples": ex_hash, ...},
                          lambda: measure(...), name="nll_teacher")
    summary["timings_seconds"] = stages.timings_rounded()

A stage's seconds accumulate in ``stages.timings`` under its name; a cached stage also records whether it was
a hit in ``stages.hits``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Iterator

from .cache import StageCache, stage_cache

log = logging.getLogger(__name__)


@contextlib.contextmanager
def timed_stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Add the wall seconds of the block to ``timings[name]`` (also on error) and log them at debug level."""
    t0 = time.perf_counter()
    log.debug("stage %s: start", name)
    try:
        yield
    finally:
        dt = time.perf_counter() - t0
        timings[name] = timings.get(name, 0.0) + dt
        log.debug("stage %s: %.2fs", name, dt)


class Stages:
    """Times named stages and runs cached ones through a :class:`StageCache`."""

    def __init__(self, cache: StageCache | None = None, timings: dict[str, float] | None = None):
        self.cache = cache if cache is not None else stage_cache()
        self.timings: dict[str, float] = timings if timings is not None else {}
        self.hits: dict[str, bool] = {}

    def __call__(self, name: str):
        """``with stages("fit"): ...`` — a timed block."""
        return timed_stage(name, self.timings)

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn(*args, **kwargs)`` as the timed stage ``name``."""
        with self(name):
            return fn(*args, **kwargs)

    def cached_json(self, stage: str, version: str, inputs: dict, compute: Callable[[], Any], *,
                    name: str | None = None) -> Any:
        """A JSON-valued stage: ``compute()`` runs only when ``(stage, version, inputs)`` is not cached."""
        entry = self.cached(stage, version, inputs, lambda: (None, compute()), name=name)
        return entry.json

    def cached(self, stage: str, version: str, inputs: dict,
               compute: Callable[[], tuple[dict | None, Any]], *, name: str | None = None):
        """A stage whose product is ``(tensors, json)``; returns the cache :class:`~semalign.cache.Entry`."""
        label = name or stage
        computed = []

        def _compute():
            computed.append(True)
            return compute()

        with self(label):
            entry = self.cache.get_or_compute(stage, version, inputs, _compute)
        self.hits[label] = not computed
        if not computed:
            log.info("%s: reused from the stage cache (%s)", label, entry.key[:12])
        return entry

    def timings_rounded(self, ndigits: int = 2) -> dict[str, float]:
        return {k: round(v, ndigits) for k, v in self.timings.items()}
