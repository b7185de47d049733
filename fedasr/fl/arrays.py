"""state_dict <-> Flower ArrayRecord.

Only floating-point tensors travel (weights, BatchNorm running statistics, the frozen normaliser statistics);
integer buffers such as ``num_batches_tracked`` are chosen by dtype, never sent and never averaged: each side
keeps its own copy from the seed model.

torch is imported where a function needs it, not with the module: the server, strategies and SecAgg+ steps use
only the numpy side, and a deployed SuperNode starts a fresh ClientApp process for every message (3 s of the
5 s such a start costs is importing torch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord

if TYPE_CHECKING:
    import torch


class ArrayMismatchError(ValueError):
    """Received arrays that do not fit the local model (missing/extra keys or other shapes)."""


def travels(tensor: torch.Tensor) -> bool:
    """True for tensors exchanged and averaged: floating point only (selected by dtype, not by name)."""
    return tensor.is_floating_point()


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
    import torch

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


def weighted_average(inputs: Iterable[Mapping[str, np.ndarray | Array]], weights) -> dict[str, np.ndarray]:
    """sum_k w_k * x_k, streamed: one float64 buffer per key, inputs consumed one at a time.

    Why streamed: a server aggregating K replies of the ~150 M-parameter CRDNN must not hold K converted copies
    (K x 600 MB). ``inputs`` may be a generator; each input's values (numpy arrays or Flower ``Array``s, the
    latter converted here one array at a time) are added to the running sum and released before the next input
    is read, so the extra memory is one float64 buffer per key (2x the fp32 model) plus one array. The sum is
    float64, not float32: a key identical in every input (frozen statistics) then comes back bit-identical and
    the result does not depend on how many clients took part. ``weights`` (non-negative, summing to 1) must be
    known before the sum starts; results come back in each key's original dtype.
    """
    weights = np.asarray(weights, dtype=np.float64)
    totals: dict[str, np.ndarray] = {}
    dtypes: dict[str, np.dtype] = {}
    count = 0
    for item in inputs:  # not enumerate(): its cached result tuple would keep the previous input alive
        count += 1
        if count > len(weights):
            raise ValueError(f"weighted_average needs one weight per input: more than {len(weights)} inputs")
        if count == 1:
            dtypes = {key: np.dtype(value.dtype) for key, value in item.items()}
            totals = {key: np.zeros(tuple(value.shape), dtype=np.float64) for key, value in item.items()}
        elif set(item.keys()) != set(totals):
            raise ArrayMismatchError(f"input {count} of the weighted average holds other keys than input 1: "
                                     f"{sorted(set(item.keys()) ^ set(totals))[:5]}")
        weight = float(weights[count - 1])
        for key in totals:
            value = _as_numpy(item[key])
            if value.shape != totals[key].shape:
                raise ArrayMismatchError(f"input {count}: array {key!r} has shape {value.shape}, input 1 had "
                                         f"{totals[key].shape}")
            totals[key] += np.multiply(value, weight, dtype=np.float64)  # float64 product, one array at a time
            del value
        del item  # released before the next input is read
    if count != len(weights) or count == 0:
        raise ValueError(f"weighted_average needs one weight per input, got {count} inputs, {len(weights)} weights")
    return {key: totals.pop(key).astype(dtypes[key]) for key in list(totals)}  # each buffer freed once cast


def combine_floating(base: Mapping[str, np.ndarray], new: dict[str, np.ndarray], combine) -> dict[str, np.ndarray]:
    """{key: combine(key, base[key], new[key])} computed in float64 and cast back to ``new``'s dtype, for the
    floating-point arrays; the others (counters) as they are in ``new``. ``new`` is consumed key by key, so no
    second full copy of a model is held. The server's step (strategies/server_optimizer.py) and the moving average
    of the global models (model_average.py) are both such a combination."""
    combined = {}
    for key in list(new):
        value = new.pop(key)
        if np.issubdtype(value.dtype, np.floating):
            value = combine(key, base[key].astype(np.float64), value.astype(np.float64)).astype(value.dtype)
        combined[key] = value
    return combined


def _as_numpy(value: np.ndarray | Array) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


# Reply arrays encoded as an update in half precision travel with this stype (raw little-endian 16-bit words of
# x_client - x_global; dtype "float16" or "bfloat16"). Flower's own Array.numpy() refuses the stype, so an encoded
# array can never be averaged by mistake as if it were weights.
UPDATE_STYPE = "fedasr.update"
_HALF = {"fp16": "float16", "bf16": "bfloat16"}  # encoding -> torch / Flower dtype name


def encode_update(record: ArrayRecord, sent: ArrayRecord, encoding: str) -> ArrayRecord:
    """A client's reply arrays in ``encoding`` (``fp32``: unchanged; ``fp16`` / ``bf16``: half the bytes).

    Half precision carries the update x_client - x_global, not the weights: weights near 1 have a fp16 step of
    ~1e-3 (bf16: ~8e-3) that would swallow a small SGD step, while the update keeps its own relative precision
    (~5e-4 in fp16, ~4e-3 in bf16). Arrays equal to the global ones (frozen statistics) encode as exact zeros and
    decode bit-identical. An update beyond fp16's range (65504) becomes infinite and the server drops that reply
    as diverged; bf16 has float32's range. Only float32 arrays are encoded; others travel as they are.
    """
    if encoding == "fp32":
        return record
    if encoding not in _HALF:
        raise ValueError(f"update_encoding must be one of fp32, fp16, bf16; got {encoding!r}")
    import torch

    name = _HALF[encoding]
    torch_dtype = getattr(torch, name)
    encoded = {}
    for key, array in record.items():
        value = array.numpy()
        if value.dtype != np.float32 or key not in sent:
            encoded[key] = array
            continue
        update = torch.from_numpy(value - sent[key].numpy()).to(torch_dtype)
        words = update.view(torch.int16).numpy().astype("<i2", copy=False)
        encoded[key] = Array(dtype=name, shape=tuple(value.shape), stype=UPDATE_STYPE, data=words.tobytes())
    return ArrayRecord(encoded)


def decode_update(record: ArrayRecord, sent: ArrayRecord) -> ArrayRecord:
    """Inverse of :func:`encode_update` on the server: x_global + update, in float32 (the server's master weights)."""
    if not any(array.stype == UPDATE_STYPE for array in record.values()):
        return record
    decoded = {}
    for key, array in record.items():
        if array.stype != UPDATE_STYPE or key not in sent or tuple(array.shape) != tuple(sent[key].shape):
            decoded[key] = array  # left as sent: the server's fit check drops the reply, naming the key
            continue
        words = np.frombuffer(array.data, dtype="<u2")
        if array.dtype == "float16":
            update = words.view("<f2").astype(np.float32)
        elif array.dtype == "bfloat16":
            update = (words.astype(np.uint32) << 16).view(np.float32)  # bf16 = the upper half of a float32
        else:
            raise ArrayMismatchError(f"encoded update {key!r} has dtype {array.dtype!r}; expected float16 or bfloat16")
        base = sent[key].numpy()
        if base.size != update.size:
            raise ArrayMismatchError(f"encoded update {key!r} holds {update.size} values for shape {array.shape}")
        decoded[key] = Array(base + update.reshape(base.shape))
    return ArrayRecord(decoded)


def decode_replies(replies: Iterable, sent: ArrayRecord) -> None:
    """Decode, in place, the encoded arrays of every training reply (error replies are left as they are)."""
    for message in replies:
        if message.has_error():
            continue
        for name, record in list(message.content.array_records.items()):
            message.content[name] = decode_update(record, sent)


def message_array_bytes(message) -> int:
    """Bytes of the serialized arrays a Flower message carries (0 for an error reply): what travels per model."""
    if message.has_error():
        return 0
    return sum(len(array.data) for record in message.content.array_records.values() for array in record.values())
