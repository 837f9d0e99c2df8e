"""The analysis suite behind ``semalign analyze``: one pass per model, then CKA maps, the resolution check,
parametric similarity, attribution profiles; PNG + JSON files and an index (``analysis.json``).

Two entry points: :func:`analyze_pair` (teacher / student specs and a task) and :func:`analyze_run` (a transfer
run directory: specs, task, data and seed from its ``config.resolved.yaml``; the transferred student from
``RUN_DIR/student``; the run's teacher attribution, semantic map and layer map are reused).
All token rows come from the same token ids (rendered once with the student tokenizer; the vocabularies are
checked to be shared), so teacher and student rows correspond one to one.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import torch

from ..attribution.layers import LayerScores
from ..errors import SemalignError
from ..paths import atomic_write_json, cache_dir
from . import cka as ckamod
from . import plots
from .activations import collect, select_tokens
from .parametric import EXTRACTIONS, parametric_similarity, seeking_windows
from .resolution import BASIS_KINDS, resolution_check

log = logging.getLogger(__name__)


@dataclass
class AnalysisOptions:
    n_samples: int = 8
    max_tokens: int = 2048
    max_length: int = 512
    keep_prefix: bool = False
    seed: int | None = None        # None: the run's seed (run mode) or 42
    dtype: str = "auto"
    device: str = "auto"
    attribution: bool = True
    resolution: bool = True
    parametric: bool = True
    extraction: str = "auto"
    bases: tuple[str, ...] = BASIS_KINDS
    rank: int = 16
    rcond: float = 1e-6
    folded: bool = True             # also align with M built from W diag(g) (final-norm gain folded, spec §8.6)
    cache: bool = True

    def validate(self) -> None:
        if self.n_samples < 1:
            raise SemalignError("--n-samples must be at least 1")
        if self.extraction not in EXTRACTIONS:
            raise SemalignError(f"--extraction {self.extraction!r}: choose one of {', '.join(EXTRACTIONS)}")
        bad = [b for b in self.bases if b not in BASIS_KINDS]
        if bad or not self.bases:
            raise SemalignError(f"--bases: unknown kind(s) {bad or '(none)'}; choose from {', '.join(BASIS_KINDS)}")


@dataclass
class _Ctx:
    out: Path
    opts: AnalysisOptions
    index: dict[str, Any] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    def stage(self, name: str, since: float) -> None:
        dt = round(time.perf_counter() - since, 2)
        self.index.setdefault("timings_seconds", {})[name] = dt
        log.info("analysis stage %s done in %.1f s", name, dt)

    def write(self, name: str, obj: Any) -> None:
        atomic_write_json(self.out / name, obj)
        self.index.setdefault("files", []).append(name)

    def figure(self, file: Path, title: str, caption: str) -> None:
        self.index.setdefault("figures", []).append({"file": file.name, "title": title, "caption": caption})


@contextlib.contextmanager
def _progress(desc: str, total: int) -> Iterator:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, disable=not log.isEnabledFor(logging.INFO))
    with prog:
        tid = prog.add_task(desc, total=total)
        yield lambda: prog.advance(tid)


def _load(spec: str, opts: AnalysisOptions):
    from ..models.arch import internals
    from ..models.load import load_model

    model, tok, resolved = load_model(spec, dtype=opts.dtype, device=opts.device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, internals(model), tok, resolved


def _pass(name: str, arch, bs, sel, *, attribution: bool, sensitivity=None, aggregate: str = "abs_of_sum"):
    sens_dtype = torch.float32
    if sensitivity and sum(p.numel() for p in sensitivity.values()) * 4 > 2.5 * 2**30:
        sens_dtype = torch.bfloat16  # keeps the accumulators of a 1.5B teacher near 2 GB
    with _progress(f"{name}: {'forward+backward' if attribution or sensitivity else 'forward'}", len(bs)) as adv:
        return collect(arch, bs, sel, attribution=attribution, aggregate=aggregate, sensitivity=sensitivity,
                       sensitivity_dtype=sens_dtype, progress=adv)


def _examples(task: str, data_dir: str | None, seed: int, n: int) -> list[dict]:
    from ..data.tasks import build_splits

    sp = build_splits(task, data_dir=data_dir, seed=seed)
    pool = sp.extract + sp.align + sp.train
    if not pool:
        raise SemalignError(f"task {task!r} has no examples to analyse")
    return pool[:n]


def _cka_figures(c: _Ctx, maps: dict[str, torch.Tensor], L_T: int, L_S: int, marked: list[tuple[int, int]]) -> dict:
    path = ckamod.depth_path(L_T, L_S)
    summary = {}
    for name, mat in maps.items():
        a, b, title = ckamod.MAPS[name]
        cross = a.endswith("teacher") and not b.endswith("teacher")
        f = plots.heatmap(mat, c.out / f"cka_{name}.png", title=f"linear CKA: {title}", ylabel=ckamod.LABELS[a],
                          xlabel=ckamod.LABELS[b], path_pairs=path if cross else (), marked=marked if cross else ())
        c.figure(f, title, "rows/columns start at 0 = embeddings; dashed = v1 depth map, red = supervised pairs"
                 if cross else "rows/columns start at 0 = embeddings")
        if cross:
            summary[name] = {"mean_along_depth_map": sum(ckamod.along_path(mat, path[1:])) / L_S}
        elif mat.shape[0] == mat.shape[1]:
            summary[name] = {"mean_diagonal": float(mat.diagonal()[1:].mean()), "mean": float(mat.mean())}
    c.write("cka.json", {"metric": "linear CKA over pooled token block outputs (h_0..h_L)", "summary": summary,
                         "maps": {n: [[round(float(x), 5) for x in row] for row in m] for n, m in maps.items()}})
    return summary


def _analyze(c: _Ctx, *, teacher: str, student: str, task: str, data_dir: str | None,
             student_after: str | None = None, run_dir: Path | None = None) -> dict:
    from ..methods.semalign.bases import SemanticMap, build_semantic_map, shared_vocab_size
    from ..models.load import load_tokenizer
    from ..data.prompts import batches
    from ..data.tasks import get_task
    from ..pairing import depth_map

    o = c.opts
    o.validate()
    if o.seed is None:
        o.seed = 42
    c.out.mkdir(parents=True, exist_ok=True)
    c.index.update({"output": str(c.out), "teacher": teacher, "student": student, "student_after": student_after,
                    "task": task, "data_dir": data_dir, "options": asdict(o), "run_dir": str(run_dir) if run_dir else None,
                    "created": datetime.now().isoformat(timespec="seconds")})
    t = time.perf_counter()
    ex = _examples(task, data_dir, o.seed, o.n_samples)
    s_tok = load_tokenizer(student)
    bs = batches(s_tok, ex, 1, max_length=o.max_length, train_on_inputs=get_task(task).train_on_inputs)
    sel = select_tokens(bs, keep_prefix=o.keep_prefix, max_tokens=o.max_tokens, seed=o.seed)
    c.index["examples"] = [e.get("id") for e in ex]
    c.index["tokens"] = sel.describe()
    log.info("analysing %d examples, %s", len(ex), sel.describe())

    run_attr = run_dir / "attribution" / "teacher.json" if run_dir else None
    t_attr = LayerScores.load(run_attr) if run_attr and run_attr.is_file() else None
    t_model, t_arch, t_tok, _ = _load(teacher, o)
    s_model, s_arch, _, _ = _load(student, o)
    L_T, L_S = t_arch.num_layers, s_arch.num_layers
    c.index["shared_vocab_ids"] = shared_vocab_size(t_tok, s_tok, t_arch.vocab_size, s_arch.vocab_size)
    c.stage("load", t)

    windows = seeking_windows(run_dir) if run_dir and o.extraction in ("auto", "seeking-run") else {}
    sens = None
    if o.parametric and o.extraction in ("auto", "sensitivity") and not windows:
        layers = sorted({depth_map(k, L_T, L_S) for k in range(1, L_S + 1)})
        names = [n for n in s_arch.projection_names if n in t_arch.projection_names]
        paths = [t_arch.projection_path(l, n) + ".weight" for l in layers for n in names]
        sens = {p: t_model.get_parameter(p) for p in paths}
    t = time.perf_counter()
    tp = _pass("teacher", t_arch, bs, sel, attribution=o.attribution and t_attr is None, sensitivity=sens)
    t_attr = t_attr or tp.attribution
    c.stage("teacher_pass", t)
    t = time.perf_counter()
    sp = _pass("student", s_arch, bs, sel, attribution=o.attribution)
    c.stage("student_pass", t)

    smap_dir = run_dir / "semantic_map" if run_dir else None
    t = time.perf_counter()
    if smap_dir is not None and (smap_dir / "M.safetensors").is_file():
        smap = SemanticMap.load(smap_dir)
    else:
        smap = build_semantic_map(t_arch, s_arch, t_tok, s_tok, rcond=o.rcond,
                                  cache_root=cache_dir() / "semantic_maps" if o.cache else None)
    smap_f = None
    if o.folded and t_arch.final_norm_gain() is not None and s_arch.final_norm_gain() is not None:
        smap_f = build_semantic_map(t_arch, s_arch, t_tok, s_tok, rcond=o.rcond, fold_final_norm=True,
                                    cache_root=cache_dir() / "semantic_maps" if o.cache else None)
    c.index["semantic_map"] = {k: v for k, v in smap.meta.items() if k != "formula"}
    c.stage("semantic_map", t)

    summary: dict[str, Any] = {}
    ops: dict[str, torch.Tensor] = {}
    if o.resolution:
        t = time.perf_counter()
        croot = cache_dir() / "analysis_operators" if o.cache else None
        res_t, _ = resolution_check(t_arch, tp.states, min(len(t_tok), t_arch.vocab_size), o.bases,
                                    rcond=o.rcond, seed=o.seed, cache_root=croot)
        res_s, ops = resolution_check(s_arch, sp.states, min(len(s_tok), s_arch.vocab_size), o.bases,
                                      rcond=o.rcond, seed=o.seed, cache_root=croot, keep_operators=("output",))
        c.write("resolution.json", {"teacher": res_t, "student": res_s,
                                    "definition": "mean over pooled tokens of cos(h, S S^T h), per layer"})
        f = plots.resolution({"teacher": res_t, "student": res_s}, c.out / "resolution.png")
        c.figure(f, "resolution of semantics", "cos(h, S S^T h) per layer in the same model; band = 10-90% of tokens")
        summary["resolution"] = {m: {k: sum(v["mean"]) / len(v["mean"]) for k, v in r["kinds"].items()}
                                 for m, r in (("teacher", res_t), ("student", res_s))}
        c.stage("resolution", t)

    if o.parametric:
        t = time.perf_counter()
        with _progress("parametric similarity", L_S) as adv:
            par = parametric_similarity(t_arch, s_arch, method="seeking-run" if windows else o.extraction,
                                        sensitivity=tp.sensitivity, run_dir=run_dir, rank=o.rank, seed=o.seed,
                                        progress=adv)
        c.write("parametric.json", par)
        f = plots.parametric(par, c.out / "parametric.png")
        c.figure(f, "parametric similarity", "extracted teacher block vs the student's own weight, per projection")
        summary["parametric"] = par["means"]
        c.stage("parametric", t)

    sets = {"teacher": tp.states, "student": sp.states, "aligned_teacher": ckamod.align_states(smap, tp.states),
            "normalised_teacher": ckamod.normalise(tp.states), "normalised_student": ckamod.normalise(sp.states)}
    t_res = ckamod.aligned_residuals(smap, tp.states)
    cos = {"before": ckamod.paired_cosines(sets["aligned_teacher"], t_res, sp.states)}
    if smap_f is not None:
        sets["folded_aligned_teacher"] = ckamod.align_states(smap_f, tp.states)
        cos["before (folded M)"] = ckamod.paired_cosines(sets["folded_aligned_teacher"],
                                                         ckamod.aligned_residuals(smap_f, tp.states), sp.states)
    attr = {"teacher": t_attr, "student": sp.attribution}
    del t_model, t_arch, tp, sens, s_model, s_arch
    gc.collect()

    if student_after is not None:
        t = time.perf_counter()
        a_model, a_arch, _, _ = _load(student_after, o)
        ap = _pass("student after", a_arch, bs, sel, attribution=o.attribution)
        sets["student_after"], attr["student_after"] = ap.states, ap.attribution
        del a_model, a_arch, ap
        gc.collect()
        c.stage("student_after_pass", t)

    marked = []
    if run_dir is not None and (run_dir / "layer_map.json").is_file():
        lm = json.loads((run_dir / "layer_map.json").read_text())
        marked = [(int(p["teacher_layer"]), int(p["student_layer"])) for p in lm.get("pairs", [])]
    t = time.perf_counter()
    maps = ckamod.cka_maps({k: v for k, v in sets.items()})
    if "output" in ops:
        maps.update(ckamod.cka_maps({"student": sets["student"],
                                     "recomposed_student": ckamod.recompose_states(ops["output"], sets["student"])},
                                    ["student_x_recomposed_student"]))
    summary["cka"] = _cka_figures(c, maps, L_T, L_S, marked)
    c.stage("cka", t)

    if "student_after" in sets:
        cos["after"] = ckamod.paired_cosines(sets["aligned_teacher"], t_res, sets["student_after"])
    c.write("alignment.json", {"definition": "mean token cos(h_S[k], M h_T[l(k)]/|h_T|), l = v1 depth map",
                               "depth_map": [depth_map(k, L_T, L_S) for k in range(1, L_S + 1)], **cos})
    curves = {f"{w} ({i})": v for w, d in cos.items() for i, v in d.items()}
    f = plots.alignment(curves, list(range(1, L_S + 1)), c.out / "alignment.png",
                        title="student vs semantically aligned teacher at depth-map pairs")
    c.figure(f, "paired-layer alignment cosine", "the v1 layer objective 1 - L_layer at every depth-map pair")
    summary["alignment"] = {w: {i: sum(v) / len(v) for i, v in d.items()} for w, d in cos.items()}

    profiles = {k: v.scores for k, v in attr.items() if v is not None}
    if profiles:
        c.write("attribution.json", {k: asdict(v) for k, v in attr.items() if v is not None})
        crit = {k: v.top(1) for k, v in attr.items() if v is not None}
        f = plots.attribution_profiles(profiles, c.out / "attribution.png", marked=crit)
        c.figure(f, "layer attribution", "Grad x Act per layer (objective: mean gold-token NLL)")
        summary["attribution_top_layer"] = {k: v[0] for k, v in crit.items()}
    from ..artifacts import peak_rss_mb

    c.index.update({"summary": summary, "wall_seconds": round(time.perf_counter() - c.t0, 2),
                    "peak_rss_mb": round(peak_rss_mb(), 1), "shapes": {"teacher_layers": L_T, "student_layers": L_S}})
    atomic_write_json(c.out / "analysis.json", c.index)
    return c.index


def analyze_pair(teacher: str, student: str, task: str = "mmlu", *, data_dir: str | None = None,
                 output: str | Path | None = None, opts: AnalysisOptions | None = None) -> dict:
    """Analyse a teacher/student pair; writes files and ``report.md``/``report.html`` into ``output``."""
    out = Path(output) if output else Path("runs") / f"analysis-{task}-{datetime.now():%Y%m%d-%H%M%S}"
    index = _analyze(_Ctx(out, opts or AnalysisOptions()), teacher=teacher, student=student, task=task,
                     data_dir=data_dir)
    index["mode"] = "pair"
    atomic_write_json(out / "analysis.json", index)
    from ..report import write_analysis_report

    write_analysis_report(out, index)
    return index


def analyze_run(run_dir: str | Path, *, output: str | Path | None = None, opts: AnalysisOptions | None = None
                ) -> dict:
    """Analyse a transfer run (teacher, student before and after); regenerates the run's report."""
    import yaml

    from ..config import make_config

    run = Path(run_dir)
    cfg_path = run / "config.resolved.yaml"
    if not cfg_path.is_file():
        raise SemalignError(f"{run} is not a run directory (no config.resolved.yaml); pass --teacher/--student/--task "
                            "to analyse a model pair instead")
    if not (run / "student" / "config.json").is_file():
        raise SemalignError(f"{run}/student is missing: the run did not finish; analyse the pair with --teacher/--student")
    cfg = make_config(yaml.safe_load(cfg_path.read_text()) or {})
    o = opts or AnalysisOptions()
    if o.seed is None:
        o.seed = cfg.seed
    out = Path(output) if output else run / "analysis"
    index = _analyze(_Ctx(out, o), teacher=cfg.teacher, student=cfg.student, task=cfg.task, data_dir=cfg.data_dir,
                     student_after=str(run / "student"), run_dir=run)
    index["mode"] = "run"
    atomic_write_json(out / "analysis.json", index)
    from ..report import regenerate_run_report, write_analysis_report

    if out.resolve() == (run / "analysis").resolve():
        regenerate_run_report(run)  # the run's report gains the analysis section
    else:
        write_analysis_report(out, index)  # leave the run directory untouched
    return index
