import math

import pytest

from engine.schedules import cosine, linear_warmup


def test_warmup_starts_at_start_and_reaches_base():
    assert cosine(0, 1.0, 0.1, 100, warmup_iters=10) == 0.0
    assert cosine(5, 1.0, 0.1, 100, warmup_iters=10) == pytest.approx(0.5)
    assert cosine(10, 1.0, 0.1, 100, warmup_iters=10) == pytest.approx(1.0)


def test_cosine_ends_at_final_and_is_monotone_after_warmup():
    vals = [cosine(i, 1.0, 0.1, 100, warmup_iters=10) for i in range(10, 101)]
    assert vals[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert cosine(55, 1.0, 0.1, 100, warmup_iters=10) == pytest.approx(0.55)  # midpoint


def test_schedule_is_global_not_per_epoch():
    # iterations 0..99 across 5 epochs of 20: the value at the start of epoch 2 is not the start value
    per_epoch = 20
    start_of_epoch2 = cosine(2 * per_epoch, 0.996, 1.0, 100)
    assert start_of_epoch2 > 0.996
    assert cosine(0, 0.996, 1.0, 100) == pytest.approx(0.996)
    assert cosine(100, 0.996, 1.0, 100) == pytest.approx(1.0)


def test_linear_warmup_then_constant():
    assert linear_warmup(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert linear_warmup(15, 0.04, 0.07, 30) == pytest.approx(0.055)
    assert linear_warmup(31, 0.04, 0.07, 30) == 0.07


def test_cosine_holds_final_past_its_end():
    # a resumed or extended run asks for iterations past total_iters: the value stays at final
    for it in (100, 101, 150, 200, 10_000):
        assert cosine(it, 1.0, 0.5, 100) == pytest.approx(0.5, abs=1e-15)
        assert cosine(it, 1.0, 0.1, 100, warmup_iters=10) == pytest.approx(0.1, abs=1e-15)
        assert cosine(it, 0.996, 1.0, 100) == pytest.approx(1.0, abs=1e-15)  # rising (EMA momentum)
    # and follows the closed form just before: final + (base - final) * (1 + cos(pi * 89 / 90)) / 2
    assert cosine(99, 1.0, 0.1, 100, warmup_iters=10) == pytest.approx(
        0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90)), rel=1e-12)


def test_bad_total():
    with pytest.raises(ValueError, match="total_iters"):
        cosine(0, 1, 0, 0)
