"""Which NeuronCores the Neuron runtime can see, so ``--parallel`` never asks for more.

The Neuron driver publishes one directory per device under
``/sys/devices/virtual/neuron_device/`` (``neuron0/``, ``neuron1/``, ...), each with a
``core_count`` file (and one ``neuron_coreN/`` directory per core); cores are
numbered across devices in that order (inf1: 4 per device, inf2/trn1: 2). A process
sees the cores its ``NEURON_RT_VISIBLE_CORES`` names ("1", "0-3", "0,2-3"), or all.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..common.errors import ConfigError

NEURON_SYSFS = "/sys/devices/virtual/neuron_device"  # where the Neuron driver publishes its devices
VISIBLE_VAR = "NEURON_RT_VISIBLE_CORES"


def device_cores(sysfs_root: str | os.PathLike) -> int:
    """NeuronCores on this host: the sum of every device's core_count (0 when there is no driver)."""
    root = Path(sysfs_root)
    devices = sorted(d for d in root.glob("neuron*") if re.fullmatch(r"neuron\d+", d.name)) if root.is_dir() else []
    total = 0
    for device in devices:
        count_file = device / "core_count"
        try:
            total += int(count_file.read_text().strip())
        except (OSError, ValueError):  # older drivers: count the per-core directories
            total += sum(1 for c in device.glob("neuron_core*") if c.is_dir())
    return total


def parse_core_list(text: str) -> set[int]:
    """NEURON_RT_VISIBLE_CORES syntax ("1", "0-3", "0,2-3") as a set of core indices; ConfigError if malformed."""
    cores: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ConfigError(f"{VISIBLE_VAR}={text!r} is not a list of cores or ranges like 0-3,5")
        low = int(match[1])
        cores.update(range(low, int(match[2] or low) + 1))
    return cores


def visible_cores(sysfs_root: str | os.PathLike, environ: dict) -> set[int]:
    """The cores this process's Neuron runtime can use: the host's, narrowed by NEURON_RT_VISIBLE_CORES."""
    cores = set(range(device_cores(sysfs_root)))
    if environ.get(VISIBLE_VAR):
        cores &= parse_core_list(environ[VISIBLE_VAR])
    return cores


def check_cores(parallel: int, first_core: int, sysfs_root: str | os.PathLike, environ: dict) -> None:
    """ConfigError unless cores first_core .. first_core+parallel-1 are all visible (one worker each)."""
    wanted = set(range(first_core, first_core + parallel))
    visible = visible_cores(sysfs_root, environ)
    if wanted <= visible:
        return
    if not visible:
        raise ConfigError(f"the neuron backend needs NeuronCores, but the Neuron runtime can see none (no devices "
                          f"under {sysfs_root}{_narrowed(environ)}); is this an inf1/inf2/trn1 host with the "
                          f"Neuron driver (aws-neuronx-dkms) installed?")
    raise ConfigError(f"--parallel {parallel} --first-core {first_core} needs NeuronCores {_span(wanted)}, but the "
                      f"Neuron runtime can see {len(visible)}: {_span(visible)}{_narrowed(environ)}; run at most "
                      f"{len(visible)} workers (one per NeuronCore)")


def _span(cores: set[int]) -> str:
    ordered = sorted(cores)
    if ordered == list(range(ordered[0], ordered[-1] + 1)) and len(ordered) > 1:
        return f"{ordered[0]}-{ordered[-1]}"
    return ",".join(map(str, ordered))


def _narrowed(environ: dict) -> str:
    value = environ.get(VISIBLE_VAR)
    return f" ({VISIBLE_VAR}={value})" if value else ""
