"""NewBob annealing of the client lr from the global dev WER."""

import pytest

from fedasr.fl.annealing import ClientLRAnnealer


def test_lr_drops_when_relative_improvement_is_below_threshold():
    annealer = ClientLRAnnealer(1.0, factor=0.8, threshold=0.0025)
    assert annealer.step(0.50) == (1.0, 1.0)  # first value: nothing to compare with
    assert annealer.step(0.40) == (1.0, 1.0)  # 20 % better
    assert annealer.step(0.3995) == pytest.approx((1.0, 0.8))  # 0.125 % better < 0.25 %
    assert annealer.lr == pytest.approx(0.8)
    assert annealer.step(0.41) == pytest.approx((0.8, 0.64))  # worse
    assert annealer.step(0.30) == pytest.approx((0.64, 0.64))


def test_patience_delays_the_drop():
    annealer = ClientLRAnnealer(1.0, factor=0.5, patience=1)
    annealer.step(0.5)
    assert annealer.step(0.5)[1] == 1.0  # first stall: patience used up
    assert annealer.step(0.5)[1] == 0.5  # second stall: drop


def test_disabled_annealing_keeps_the_lr():
    annealer = ClientLRAnnealer(0.3, enabled=False)
    for wer in (0.5, 0.6, 0.7):
        assert annealer.step(wer) == (0.3, 0.3)


def test_state_round_trip_continues_identically():
    first = ClientLRAnnealer(1.0, factor=0.8, patience=1)
    for wer in (0.5, 0.5):
        first.step(wer)
    second = ClientLRAnnealer(1.0, factor=0.8, patience=1)
    second.load_state_dict(first.state_dict())
    assert [first.step(w) for w in (0.5, 0.4, 0.4)] == [second.step(w) for w in (0.5, 0.4, 0.4)]


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="factor"):
        ClientLRAnnealer(1.0, factor=1.5)
