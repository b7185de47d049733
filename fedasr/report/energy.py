"""Energy and CO2 estimates: compute time x device power x PUE, times the grid's carbon intensity.

Figures are the ones the reference used (Gao et al. 2022, after Parcollet & Ravanelli 2021): a data-center V100
at 250 W in a facility of PUE 1.67, edge devices at 7.5 W (no PUE), and grid intensities in kg CO2 per kWh.
A run's compute time is what the run measured: training seconds for centralized runs, the sum over rounds of
the clients' fit seconds (when reported) plus the server's evaluation time for federated runs.
"""

from __future__ import annotations

from dataclasses import dataclass


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
