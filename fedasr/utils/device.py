"""Where torch computes: the one resolution of a device request, for every stage (central training, evaluation,
the federated server and its clients).

A request is ``auto`` (a CUDA GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` (the first visible GPU) or
``cuda:N``. "Visible" is what CUDA_VISIBLE_DEVICES leaves: in a Ray worker given a GPU share, Ray sets it to the
GPU it assigned, so there ``cuda`` (= ``cuda:0``) is that GPU. A request that cannot be met raises
:class:`DeviceError` at once, naming the request and what was found: no run silently falls back to the CPU.

Precision (SpeechBrain's run option ``precision``): ``fp32`` (default, bit-exact with earlier runs), ``bf16`` or
``fp16`` (autocast; fp16 also scales the gradients, and needs CUDA). The weights, the frozen normaliser statistics
and the aggregation stay in fp32/fp64 whatever the precision.
"""

from __future__ import annotations

import os
import re

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"
PRECISIONS = ("fp32", "fp16", "bf16")
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class DeviceError(ValueError):
    """A device or precision request that is malformed or that this machine cannot meet."""


def parse_device(request, what: str = "device") -> tuple[str, int | None]:
    """``(kind, index)`` of a request (kind auto | cpu | cuda; index only for ``cuda:N``); syntax only."""
    text = str(request).strip().lower() if request is not None else "auto"
    match = _DEVICE.match(text)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise DeviceError(f"{what} must be one of {DEVICE_CHOICES} (e.g. cuda:0), got {request!r}")
    return match.group(1), int(match.group(2)) if match.group(2) is not None else None


def check_device(request, what: str = "device") -> str:
    """The request normalised (``" CUDA "`` -> ``"cuda"``), or DeviceError for a malformed one; nothing probed."""
    kind, index = parse_device(request, what)
    return kind if index is None else f"{kind}:{index}"


def visible_gpus() -> int:
    """CUDA GPUs torch can use in this process (0 without CUDA); does not create a CUDA context."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_findings() -> str:
    """What this process sees, for error messages: the torch build, CUDA_VISIBLE_DEVICES, the GPU count."""
    import torch

    build = f"torch {torch.__version__}, " + (f"built with CUDA {torch.version.cuda}" if torch.version.cuda
                                              else "a CPU-only build")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    env = "" if visible is None else f", CUDA_VISIBLE_DEVICES={visible!r}"
    return f"{build}{env}, {visible_gpus()} CUDA GPU(s) visible"


def resolve_device(request="auto", what: str = "device") -> str:
    """``"cpu"`` or ``"cuda:N"`` for a request (see the module's docstring); DeviceError when it cannot be met."""
    kind, index = parse_device(request, what)
    if kind == "cpu":
        return "cpu"
    count = visible_gpus()
    if kind == "auto":
        return "cuda:0" if count else "cpu"
    if count == 0:
        raise DeviceError(f"{what} {request!r} asks for a CUDA GPU but none is usable here ({gpu_findings()}). "
                          "Use device cpu (or auto), or run on a machine with a GPU and a CUDA build of torch.")
    index = index or 0
    if index >= count:
        raise DeviceError(f"{what} {request!r} names GPU {index} but only cuda:0..cuda:{count - 1} are visible "
                          f"({gpu_findings()}). Name a visible GPU, or use cuda (the first one).")
    return f"cuda:{index}"


def check_precision(precision, device: str, what: str = "precision") -> str:
    """``precision`` when the (resolved) ``device`` can train at it, else DeviceError (fp16 needs CUDA)."""
    value = str(precision).strip().lower()
    if value not in PRECISIONS:
        raise DeviceError(f"{what} must be one of {PRECISIONS}, got {precision!r}")
    if value == "fp16" and not str(device).startswith("cuda"):
        raise DeviceError(f"{what} fp16 needs a CUDA device, the device is {device!r}: use bf16 on the CPU "
                          "(or fp32)")
    return value


def autocast(device: str, precision: str = "fp32"):
    """A torch.autocast context for ``precision`` on ``device`` (disabled at fp32: the numbers stay bit-exact)."""
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return torch.autocast(device_type=str(device).split(":")[0], dtype=dtype, enabled=dtype is not None)


def release_gpu_memory(device: str) -> None:
    """After a client's training on CUDA: collect its freed objects and return the cached blocks to the driver, so
    the next client in this worker starts from the model alone. Nothing on the CPU (cheap there)."""
    if not str(device).startswith("cuda"):
        return
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def peak_gpu_memory(device: str, reset: bool = False) -> int | None:
    """Peak bytes allocated by torch on a CUDA ``device`` since the last reset (None on the CPU)."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    peak = int(torch.cuda.max_memory_allocated(device))
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


GPU_LOADER_WORKERS = 4  # audio decoding workers per process feeding a GPU (SpeechBrain's CV recipes use 4-6)


def loader_options(device: str, num_workers="auto") -> dict:
    """DataLoader options for a process computing on ``device``: ``num_workers`` ("auto": none on the CPU, where
    the training itself needs the cores, and up to GPU_LOADER_WORKERS on a GPU, never more than the cores this
    process may use) and pinned memory for host-to-GPU copies."""
    if num_workers in (None, "auto"):
        num_workers = min(GPU_LOADER_WORKERS, max(usable_cores() - 1, 0)) if str(device).startswith("cuda") else 0
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ValueError(f"num_workers must be auto or an integer >= 0, got {num_workers!r}")
    options = {"num_workers": num_workers, "pin_memory": str(device).startswith("cuda")}
    if num_workers > 0:
        options["persistent_workers"] = False  # a client's loader lives one fit: workers end with it
    return options
