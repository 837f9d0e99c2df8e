"""Analysis suite: CKA heat-maps, resolution-of-semantics check, parametric similarity, attribution profiles,
self-contained HTML reports (see docs/analysis.md). Entry points: :func:`semalign.analysis.suite.analyze_pair`,
:func:`semalign.analysis.suite.analyze_run` and ``semalign analyze``."""
