import math

import pytest

from rigl_ds.core.schedule import UpdateSchedule


def test_values_at_key_steps_cosine():
    s = UpdateSchedule(delta=100, t_end=1000, alpha=0.3)
    assert s.drop_fraction(0) == pytest.approx(0.3)
    assert s.drop_fraction(100) == pytest.approx(0.15 * (1 + math.cos(math.pi * 0.1)))
    assert s.drop_fraction(500) == pytest.approx(0.15)
    assert s.drop_fraction(1000) == 0.0
    assert s.drop_fraction(5000) == 0.0
    assert [s.is_update_step(t) for t in (0, 99, 100, 500, 900, 999, 1000, 1100)] == [
        False, False, True, True, True, False, False, False]
    assert s.update_steps() == list(range(100, 1000, 100)) and s.num_updates == 9


def test_constant_anneal():
    s = UpdateSchedule(delta=10, t_end=100, alpha=0.2, anneal="constant")
    assert [s.drop_fraction(t) for t in (0, 10, 50, 99, 100)] == [0.2, 0.2, 0.2, 0.2, 0.0]


def test_t_end_fraction_or_absolute():
    assert UpdateSchedule.from_total_steps(32000, t_end=0.78).t_end == 24960
    assert UpdateSchedule.from_total_steps(32000, t_end=25000).t_end == 25000
    assert UpdateSchedule.from_total_steps(100, t_end=1.0).t_end == 100
    with pytest.raises(ValueError, match="1.5"):
        UpdateSchedule.from_total_steps(100, t_end=1.5)


def test_accumulation_window_ends_at_update_steps():
    s = UpdateSchedule(delta=10, t_end=35, grad_accumulation_n=3)
    acc = [t for t in range(40) if s.accumulates(t)]
    assert acc == [8, 9, 10, 18, 19, 20, 28, 29, 30]
    assert [t for t in range(40) if UpdateSchedule(delta=10, t_end=35).accumulates(t)] == [10, 20, 30]


@pytest.mark.parametrize("kwargs,word", [
    ({"delta": 0}, "delta"), ({"alpha": 1.5}, "alpha"), ({"anneal": "linear"}, "anneal"),
    ({"grad_accumulation_n": 0}, "grad_accumulation_n"), ({"delta": 5, "grad_accumulation_n": 6}, "grad_accumulation_n"),
])
def test_bad_knobs(kwargs, word):
    with pytest.raises(ValueError, match=word):
        UpdateSchedule(t_end=100, **kwargs)
