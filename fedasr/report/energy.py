"""Energy and CO2 estimates: compute time x device power x PUE, times the grid's carbon intensity.

Figures are the ones the reference used (Gao et al. 2022, after Parcollet & Ravanelli 2021): a data-center V100
at 250 W in a facility of PUE 1.67, edge devices at 7.5 W (no PUE), and grid intensities in kg CO2 per kWh.
A run's compute time is what the run measured: training seconds for centralized runs, the sum over rounds of
the clients' fit seconds (when reported) plus the server's evaluation time for federated runs.

Where codecarbon is installed, ``track_energy`` also measures each run (``energy.json`` in its folder) and the
comparison shows that measurement beside the profile estimate.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    watts: float
    pue: float
    description: str


PROFILES = {
    "v100": DeviceProfile("v100", 250.0, 1.67, "data-center NVIDIA V100 (250 W), PUE 1.67"),
    "edge": DeviceProfile("edge", 7.5, 1.0, "edge device (7.5 W), no data-center overhead"),
}

# kg CO2 per kWh, as in the reference.
GRID_INTENSITY = {"france": 0.079, "uk": 0.509, "us": 0.547, "china": 0.975}


class UnknownProfileError(ValueError):
    pass


def device_profile(name: str) -> DeviceProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownProfileError(f"unknown device profile {name!r}; choose one of {sorted(PROFILES)}") from None


def grid_intensity(name: str) -> float:
    try:
        return GRID_INTENSITY[name]
    except KeyError:
        raise UnknownProfileError(f"unknown grid {name!r}; choose one of {sorted(GRID_INTENSITY)}") from None


def energy_kwh(seconds: float, profile: DeviceProfile) -> float:
    """Energy of ``seconds`` of compute on one device of ``profile``, facility overhead included."""
    return seconds / 3600.0 * profile.watts * profile.pue / 1000.0


def co2_kg(kwh: float, grid: str) -> float:
    return kwh * grid_intensity(grid)


# ---- measured energy (codecarbon) ---------------------------------------------------------------------------------

ENERGY_FILE = "energy.json"
ENERGY_ENV = "FEDASR_ENERGY"  # "0" turns the measurement off (e.g. many short runs in tests)


@contextmanager
def track_energy(folder: str | Path, *, country_iso_code: str = "FRA", accumulate: bool = False) -> Iterator[None]:
    """Measure the energy of the block with codecarbon's offline tracker and write ``folder/energy.json``.

    codecarbon reads RAPL (CPU, RAM) and NVML (GPU) counters where the machine exposes them and otherwise models
    the CPU from its TDP and load; the file records what it reported so ``fedasr compare`` can show measured kWh
    beside the profile estimate. Whole-machine mode: a federated simulation's Ray workers are counted too. Without
    codecarbon installed, or with FEDASR_ENERGY=0, the block runs unmeasured and no file is written.
    ``accumulate``: a resumed run adds this part to the energy and seconds already recorded (``parts`` counts them),
    so the record covers the whole run, not its last part.
    """
    tracker = _start_tracker(country_iso_code)
    try:
        yield
    finally:
        if tracker is not None:
            _stop_and_write(tracker, Path(folder) / ENERGY_FILE, accumulate)


def _start_tracker(country_iso_code: str):
    if os.environ.get(ENERGY_ENV, "1") == "0":
        return None
    try:
        from codecarbon import OfflineEmissionsTracker
    except ImportError:
        log.info("codecarbon is not installed: energy is estimated from device profiles only")
        return None
    tracker = OfflineEmissionsTracker(country_iso_code=country_iso_code, output_methods=[], log_level="error",
                                      tracking_mode="machine")
    tracker.start()
    return tracker


ADDITIVE_FIELDS = ("kwh", "cpu_kwh", "gpu_kwh", "ram_kwh", "seconds")


def _stop_and_write(tracker, path: Path, accumulate: bool = False) -> None:
    from fedasr.utils.io import atomic_write_json

    tracker.stop()
    data = tracker.final_emissions_data
    if data is None:
        return
    record = {
        "kwh": float(data.energy_consumed), "cpu_kwh": float(data.cpu_energy), "gpu_kwh": float(data.gpu_energy),
        "ram_kwh": float(data.ram_energy), "seconds": float(data.duration), "cpu_model": data.cpu_model,
        "gpu_model": data.gpu_model, "cpu_count": data.cpu_count, "gpu_count": data.gpu_count,
        "tool": "codecarbon (offline, machine mode)", "parts": 1,
    }
    atomic_write_json(path, add_earlier_parts(record, path) if accumulate else record)


def add_earlier_parts(record: dict, path: Path) -> dict:
    """``record`` plus the energy and seconds of the earlier parts of the run recorded in ``path`` (if any)."""
    if not path.exists():
        return record
    earlier = json.loads(path.read_text(encoding="utf-8"))
    summed = {key: record[key] + float(earlier.get(key, 0.0)) for key in ADDITIVE_FIELDS}
    return {**record, **summed, "parts": int(earlier.get("parts", 1)) + 1}


def measured_kwh(folder: str | Path) -> float | None:
    """kWh that codecarbon measured for the run in ``folder`` (None when it was not measured)."""
    path = Path(folder) / ENERGY_FILE
    if not path.exists():
        return None
    return float(json.loads(path.read_text(encoding="utf-8"))["kwh"])
