"""Layer x layer linear-CKA maps and paired-layer alignment cosines over pooled token states.

States are ``[L+1, N, D]`` (h_0 = embeddings .. h_L), with the same N token rows for every model. Linear CKA is
computed from centred, Frobenius-normalised token Grams (:func:`semalign.similarity.gram_features`), once per
state set, so an (L_T+1) x (L_S+1) map costs O((L_T + L_S) N^2 D) instead of O(L_T L_S N D_T D_S).
"""

from __future__ import annotations

import logging

import torch

from ..methods.semalign.bases import SemanticMap
from ..pairing import depth_map
from ..similarity import cka_from_grams, gram_features

log = logging.getLogger(__name__)

# name -> (row set, column set, title)
MAPS: dict[str, tuple[str, str, str]] = {
    "teacher_x_teacher": ("teacher", "teacher", "teacher x teacher"),
    "student_x_student": ("student", "student", "student x student"),
    "teacher_x_student": ("teacher", "student", "teacher x student"),
    "aligned_teacher_x_student": ("aligned_teacher", "student", "teacher (aligned, M h/|h|) x student"),
    "teacher_x_aligned_teacher": ("teacher", "aligned_teacher", "teacher x teacher aligned (with vs without)"),
    "student_x_recomposed_student": ("student", "recomposed_student",
                                     "student x student recomposed on its own bases"),
    "teacher_x_normalised_teacher": ("teacher", "normalised_teacher", "teacher x teacher normalised per token"),
    "normalised_teacher_x_normalised_student": ("normalised_teacher", "normalised_student",
                                                "teacher x student, both normalised per token"),
    "aligned_teacher_x_normalised_student": ("aligned_teacher", "normalised_student",
                                             "teacher (aligned) x student normalised per token"),
    "folded_aligned_teacher_x_student": ("folded_aligned_teacher", "student",
                                         "teacher (aligned, final-norm gain folded) x student"),
    "student_before_x_after": ("student", "student_after", "student before x after transfer"),
    "teacher_x_student_after": ("teacher", "student_after", "teacher x student after transfer"),
    "aligned_teacher_x_student_after": ("aligned_teacher", "student_after",
                                        "teacher (aligned) x student after transfer"),
}

LABELS = {"teacher": "teacher layer", "aligned_teacher": "teacher layer (aligned)", "student": "student layer",
          "normalised_teacher": "teacher layer (h/|h|)", "normalised_student": "student layer (h/|h|)",
          "folded_aligned_teacher": "teacher layer (aligned, folded M)",
          "recomposed_student": "student layer (recomposed)", "student_after": "student layer (after transfer)"}


def align_states(smap: SemanticMap, states: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """Teacher states mapped into student space, M h/|h| per token: [L+1, N, D_S] float32."""
    return torch.cat([smap.apply(states[i:i + chunk]) for i in range(0, states.shape[0], chunk)])


def normalise(states: torch.Tensor) -> torch.Tensor:
    """h/|h| per token (float32)."""
    h = states.float()
    return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def recompose_states(P: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """S S^T h/|h| per token (a model's own decompose -> recompose)."""
    h = states.float()
    return (h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ P.float()


def cka_maps(sets: dict[str, torch.Tensor], wanted: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Every map in :data:`MAPS` whose two sets are present (or the ``wanted`` subset)."""
    names = [n for n, (a, b, _) in MAPS.items() if a in sets and b in sets and (wanted is None or n in wanted)]
    needed = sorted({s for n in names for s in MAPS[n][:2]})
    grams = {}
    for s in needed:
        log.info("centred Gram features of %s (%d layers x %d tokens)", s, sets[s].shape[0], sets[s].shape[1])
        grams[s] = gram_features(sets[s])
    return {n: cka_from_grams(grams[MAPS[n][0]], grams[MAPS[n][1]]) for n in names}


def depth_path(L_T: int, L_S: int) -> list[tuple[int, int]]:
    """(teacher layer, student layer) along the v1 depth map, starting at the embeddings (0, 0)."""
    return [(0, 0)] + [(depth_map(k, L_T, L_S), k) for k in range(1, L_S + 1)]


def along_path(mat: torch.Tensor, path: list[tuple[int, int]]) -> list[float]:
    return [float(mat[i, j]) for i, j in path]


def paired_cosines(aligned_teacher: torch.Tensor, aligned_teacher_residual: torch.Tensor | None,
                   student: torch.Tensor) -> dict[str, list[float]]:
    """Mean token cosine between student layer k and the aligned teacher at l(k), k = 1..L_S, at the
    ``block_output`` (h) and ``residual`` (Delta = h_l - h_{l-1}) interfaces. This is the v1 layer objective
    1 - L_layer evaluated at every depth-map pair (before any training, or after)."""
    L_T, L_S = aligned_teacher.shape[0] - 1, student.shape[0] - 1
    out: dict[str, list[float]] = {"block_output": [], "residual": []}
    for k in range(1, L_S + 1):
        l = depth_map(k, L_T, L_S)
        out["block_output"].append(float(torch.nn.functional.cosine_similarity(
            student[k].float(), aligned_teacher[l], dim=-1, eps=1e-12).mean()))
        if aligned_teacher_residual is not None:
            ds = student[k].float() - student[k - 1].float()
            out["residual"].append(float(torch.nn.functional.cosine_similarity(
                ds, aligned_teacher_residual[l - 1], dim=-1, eps=1e-12).mean()))
    if aligned_teacher_residual is None:
        out.pop("residual")
    return out


def aligned_residuals(smap: SemanticMap, teacher: torch.Tensor) -> torch.Tensor:
    """M Delta_l/|Delta_l| for l = 1..L_T (the v1 default interface, per token): [L_T, N, D_S]."""
    return torch.stack([smap.apply(teacher[l] - teacher[l - 1]) for l in range(1, teacher.shape[0])])
