"""state_dict <-> ArrayRecord: which tensors travel, dtypes, integer buffers, mismatches, float64 averaging."""

import numpy as np
import pytest
import torch

from fedasr.fl.arrays import (
    ArrayMismatchError,
    all_finite,
    arrayrecord_to_state,
    arrays_to_numpy,
    numpy_to_arrayrecord,
    state_to_arrayrecord,
    weighted_average,
)
from fl_fakes import FakeASR


def test_only_float_tensors_travel_and_bn_stats_are_included():
    state = FakeASR().state_dict()
    record = state_to_arrayrecord(state)
    assert "norm.num_batches_tracked" in state and state["norm.num_batches_tracked"].dtype == torch.int64
    assert "norm.num_batches_tracked" not in record
    for key in ("linear.weight", "norm.running_mean", "norm.running_var", "normaliser_mean"):
        assert key in record


def test_round_trip_keeps_values_dtypes_and_local_integer_buffers():
    sender = FakeASR()
    sender.net.linear.weight.data += 1.5
    sender.net.norm.num_batches_tracked += 99
    receiver_template = FakeASR().state_dict()
    state = arrayrecord_to_state(state_to_arrayrecord(sender.state_dict()), receiver_template)
    assert torch.equal(state["linear.weight"], sender.state_dict()["linear.weight"])
    assert state["norm.num_batches_tracked"].item() == receiver_template["norm.num_batches_tracked"].item() == 0
    assert all(state[k].dtype == receiver_template[k].dtype for k in state)


def test_mismatched_keys_and_shapes_are_clear_errors():
    template = FakeASR().state_dict()
    arrays = arrays_to_numpy(state_to_arrayrecord(template))
    del arrays["linear.bias"]
    with pytest.raises(ArrayMismatchError, match="missing \\['linear.bias'\\]"):
        arrayrecord_to_state(numpy_to_arrayrecord(arrays), template)
    arrays = arrays_to_numpy(state_to_arrayrecord(template))
    arrays["linear.weight"] = np.zeros((2, 2), dtype=np.float32)
    with pytest.raises(ArrayMismatchError, match="shape"):
        arrayrecord_to_state(numpy_to_arrayrecord(arrays), template)


def test_weighted_average_is_float64_and_leaves_identical_arrays_bit_exact():
    frozen = np.array([0.1, 1e-7, 12345.678], dtype=np.float32)
    inputs = [{"w": np.full(3, float(i), dtype=np.float32), "frozen": frozen.copy()} for i in range(3)]
    weights = np.array([0.2, 0.3, 0.5])
    out = weighted_average(inputs, weights)
    assert out["w"].dtype == np.float32
    np.testing.assert_allclose(out["w"], 0.3 + 1.0, rtol=1e-6)
    assert np.array_equal(out["frozen"], frozen)


def test_all_finite_flags_nan():
    assert all_finite(numpy_to_arrayrecord({"a": np.ones(3, dtype=np.float32)}))
    assert not all_finite(numpy_to_arrayrecord({"a": np.array([1.0, np.nan], dtype=np.float32)}))


def test_weighted_average_matches_the_list_formula_and_reads_flower_arrays():
    rng = np.random.default_rng(0)
    inputs = [{"w": rng.standard_normal((3, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
              for _ in range(4)]
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    records = (numpy_to_arrayrecord(item) for item in inputs)  # a generator of ArrayRecords, as the server passes
    out = weighted_average(records, weights)
    for key in ("w", "b"):
        expected = sum(w * item[key].astype(np.float64) for w, item in zip(weights, inputs)).astype(np.float32)
        assert out[key].dtype == np.float32
        np.testing.assert_array_equal(out[key], expected)


def test_weighted_average_releases_each_input_before_reading_the_next():
    import weakref

    alive_when_next_read = []
    previous = []

    def inputs():
        for value in range(5):
            alive_when_next_read.append(sum(ref() is not None for ref in previous))
            array = np.full(1000, float(value), dtype=np.float32)
            previous.append(weakref.ref(array))
            yield {"w": array}
            del array

    out = weighted_average(inputs(), np.full(5, 0.2))
    np.testing.assert_allclose(out["w"], 2.0, rtol=1e-6)
    assert alive_when_next_read == [0, 0, 0, 0, 0]


def test_weighted_average_rejects_wrong_counts_and_other_keys():
    one = {"w": np.ones(2, dtype=np.float32)}
    with pytest.raises(ValueError, match="one weight per input"):
        weighted_average(iter([one, one]), np.array([1.0]))
    with pytest.raises(ValueError, match="one weight per input"):
        weighted_average(iter([one]), np.array([0.5, 0.5]))
    with pytest.raises(ArrayMismatchError, match="other keys"):
        weighted_average(iter([one, {"v": np.ones(2, dtype=np.float32)}]), np.array([0.5, 0.5]))
    with pytest.raises(ArrayMismatchError, match="shape"):
        weighted_average(iter([one, {"w": np.ones(3, dtype=np.float32)}]), np.array([0.5, 0.5]))
