"""state_dict <-> Flower ArrayRecord.

Only floating-point tensors travel (weights, BatchNorm running statistics, the frozen normaliser statistics);
integer buffers such as ``num_batches_tracked`` are chosen by dtype, never sent and never averaged: each side
keeps its own copy from the seed model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


class ArrayMismatchError(ValueError):
    """Received arrays that do not fit the local model (missing/extra keys or other shapes)."""


def travels(tensor: torch.Tensor) -> bool:
    """True for tensors exchanged and averaged: floating point only (selected by dtype, not by name)."""
    return torch.is_floating_point(tensor)


def state_to_arrayrecord(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The floating-point part of ``state`` as an ArrayRecord (copies, CPU, original dtypes)."""
    return ArrayRecord({key: Array(tensor.detach().cpu().numpy().copy()) for key, tensor in state.items() if travels(tensor)})


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def numpy_to_arrayrecord(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def arrayrecord_to_state(record: ArrayRecord, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state_dict: floats from ``record`` (cast to the template's dtypes), integer buffers from ``template``.

    Raises :class:`ArrayMismatchError` naming the keys when ``record`` does not match the template's
    floating-point entries (a model built from another configuration, usually).
    """
    expected = {key for key, tensor in template.items() if travels(tensor)}
    received = set(record.keys())
    if expected != received:
        missing, extra = sorted(expected - received), sorted(received - expected)
        raise ArrayMismatchError(
            f"received arrays do not match the local model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}. Server and clients must be built from the "
            "same seed checkpoint and model hparams."
        )
    state: dict[str, torch.Tensor] = {}
    for key, tensor in template.items():
        if not travels(tensor):
            state[key] = tensor.detach().clone()
            continue
        value = torch.from_numpy(np.array(record[key].numpy(), copy=True))
        if tuple(value.shape) != tuple(tensor.shape):
            raise ArrayMismatchError(
                f"array {key!r} has shape {tuple(value.shape)}, the local model expects {tuple(tensor.shape)}. "
                "Server and clients must be built from the same seed checkpoint and model hparams."
            )
        state[key] = value.to(dtype=tensor.dtype)
    return state


def all_finite(record: ArrayRecord) -> bool:
    """False when any array holds NaN or infinity (a diverged client)."""
    return all(np.isfinite(array.numpy()).all() for array in record.values())


def weighted_average(arrays: list[Mapping[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
    """sum_k w_k * x_k computed in float64 per key, returned in each key's original dtype.

    ``weights`` must be non-negative and sum to 1; a key identical in every input (frozen statistics) comes
    back bit-identical.
    """
    if len(arrays) != len(weights) or not arrays:
        raise ValueError(f"weighted_average needs one weight per input, got {len(arrays)} inputs, {len(weights)} weights")
    averaged = {}
    for key, first in arrays[0].items():
        total = np.zeros(first.shape, dtype=np.float64)
        for weight, item in zip(weights, arrays):
            total += float(weight) * item[key].astype(np.float64)
        averaged[key] = total.astype(first.dtype)
    return averaged


def message_array_bytes(message) -> int:
    """Bytes of the serialized arrays a Flower message carries (0 for an error reply): what travels per model."""
    if message.has_error():
        return 0
    return sum(len(array.data) for record in message.content.array_records.values() for array in record.values())
