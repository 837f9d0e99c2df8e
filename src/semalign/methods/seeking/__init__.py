"""Seeking (PostPKT, arXiv 2310.11451): ``extract`` (sensitivity, windows, SVD) and ``recipe`` (the method)."""

from . import recipe  # noqa: F401  (registers "seeking")
