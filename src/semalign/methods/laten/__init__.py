"""LaTen (PrePKT, arXiv 2505.14436): ``attribution`` (logit-lens neuron scores), ``translator`` (hypernetwork +
injection) and ``recipe`` (the method)."""

from . import recipe  # noqa: F401  (registers "laten")
