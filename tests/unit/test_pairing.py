from fractions import Fraction

import pytest

from semalign.errors import SemalignError
from semalign.pairing import (critical_pairs, depth_map, full_depth_map, interpolation, k_dagger,
                              windowed_argmax_pairs)


def test_qwen_pair_table_from_spec():
    # spec §2.3 worked example, 28 -> 24
    assert full_depth_map(28, 24) == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 21, 22, 23, 24, 25, 26, 28]
    assert [(k_dagger(c, 28, 24), depth_map(k_dagger(c, 28, 24), 28, 24)) for c in (6, 13, 20, 27)] == \
        [(6, 7), (12, 14), (18, 21), (24, 28)]


def test_llama_pair_table_from_spec():
    m = full_depth_map(40, 32)
    assert m[:8] == [1, 2, 3, 5, 6, 7, 8, 10] and m[-1] == 40
    missed = sorted(set(range(1, 41)) - set(m))
    assert missed == [4, 9, 14, 19, 24, 29, 34, 39]
    assert [k_dagger(c, 40, 32) for c in missed] == [4, 8, 12, 16, 20, 24, 28, 32]


def test_integer_floor_where_float_fails():
    assert depth_map(49, 1, 49) == 1  # float floor(1/49*49) can give 0
    for L_T in range(1, 60):
        for L_S in range(1, 60):
            for k in range(1, L_S + 1):
                assert depth_map(k, L_T, L_S) == max(1, int(Fraction(L_T * k, L_S)))


def test_equal_depths_is_identity():
    assert full_depth_map(7, 7) == list(range(1, 8))
    assert all(k_dagger(c, 7, 7) == c for c in range(1, 8))


def test_one_layer_student():
    assert full_depth_map(12, 1) == [12]
    assert all(k_dagger(c, 12, 1) == 1 for c in range(1, 13))
    lm = critical_pairs([0.1] * 5 + [3.0] + [0.2] * 6, 1, top_k=3)
    assert [(p.student_layer, p.teacher_layer, p.critical_teacher_layer) for p in lm.pairs] == [(1, 12, 6)]


def test_teacher_shallower_shares_layers():
    m = full_depth_map(2, 5)
    assert m == [1, 1, 1, 1, 2]
    lm = critical_pairs([1.0, 2.0], 5)
    assert lm.pairs[0].student_layer == 5 and any("shallower" in n for n in lm.notes)
    w = windowed_argmax_pairs([1.0, 2.0], 5)
    assert [p.teacher_layer for p in w.pairs] == [1, 1, 1, 1, 2]
    assert any("empty window" in n for n in w.notes)


def test_interpolation_examples_from_spec():
    assert interpolation(1, 28, 24) == (1, 2, pytest.approx(1 / 6))
    assert interpolation(3, 28, 24) == (3, 4, pytest.approx(0.5))
    assert interpolation(24, 28, 24) == (27, 28, pytest.approx(1.0))
    assert interpolation(1, 40, 32) == (1, 2, pytest.approx(0.25))
    assert interpolation(32, 40, 32) == (39, 40, pytest.approx(1.0))


def test_top_k_duplicates_keep_higher_score():
    scores = [0.0] * 28
    scores[5], scores[6] = 5.0, 4.0  # T6 and T7 both map to S6
    lm = critical_pairs(scores, 24, top_k=2)
    assert [p.critical_teacher_layer for p in lm.pairs] == [6]  # T7 skipped
    assert lm.notes
    lm3 = critical_pairs(scores[:5] + [5.0, 4.0, 3.0] + scores[8:], 24, top_k=3)
    assert sorted(p.critical_teacher_layer for p in lm3.pairs) == [6, 8]


def test_windowed_argmax_monotone_and_in_window():
    import random

    rng = random.Random(0)
    scores = [rng.random() for _ in range(28)]
    lm = windowed_argmax_pairs(scores, 24)
    src = [p.teacher_layer for p in lm.pairs]
    assert src == sorted(src) and len(set(src)) == 24
    prev = 0
    for k, s in enumerate(src, 1):
        hi = depth_map(k, 28, 24)
        assert prev < s <= hi
        prev = hi


def test_bad_ranges():
    with pytest.raises(SemalignError):
        depth_map(0, 4, 2)
    with pytest.raises(SemalignError):
        k_dagger(5, 4, 2)
    with pytest.raises(SemalignError):
        critical_pairs([1.0], 1, top_k=0)
