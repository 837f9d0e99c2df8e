"""Rendering of run and analysis reports to self-contained files (below ``report.py`` and ``analysis/``)."""
