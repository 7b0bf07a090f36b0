"""Which NeuronCores the Neuron runtime can see, so ``--parallel`` never asks for more.

The Neuron driver publishes one directory per device under
``/sys/devices/virtual/neuron_device/`` (``neuron0/``, ``neuron1/``, ...), each with a
``core_count`` file (and one ``neuron_coreN/`` directory per core); cores are
numbered across devices in that order (inf1: 4 per device, inf2/trn1: 2). A process
sees the cores its ``NEURON_RT_VISIBLE_CORES`` names ("1", "0-3", "0,2-3"), or all.

Which NeuronCore generation the host has (:func:`host_family`, checked against a model by
:func:`check_model_family`): the driver writes each device's
``neuronN/info/architecture/device_name`` ("Inferentia", "Inferentia2", "Trainium1",
"Trainium2") and ``instance_type`` ("Inf1", "Inf2", "Trn1", "Trn2"); AWS's Neuron sysfs user
guide documents the files, the driver's per-generation code (aws-neuron-driver
v1/v2/v3 ``neuron_dhal_v*.c``) the exact values. A binary compiled by tensorflow-neuron
(neuron-cc) runs only on NeuronCore v1 (inf1), one by tensorflow-neuronx (neuronx-cc) only on
NeuronCore v2 (inf2, trn1); on a mismatch the runtime fails only at the first inference, with an
untyped TensorFlow OpError. Neither the installed package (tensorflow-neuronx reuses
tensorflow_neuron's code, so both may import) nor NEURON_RT_VISIBLE_CORES says which hardware
is there, so only the driver's files are read; where they are absent (no driver, /sys not
mounted, an older driver or a layout that moved them) the generation is unknown, and nothing
is guessed.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import ConfigError, ModelFormatError

NEURON_SYSFS = "/sys/devices/virtual/neuron_device"  # where the Neuron driver publishes its devices
VISIBLE_VAR = "NEURON_RT_VISIBLE_CORES"
# The Neuron runtime's opt-in (runtime 2.25+) to run a binary compiled for an older NeuronCore
# generation on a newer one (AWS's example: trn1 on trn2); never NeuronCore v1's.
LEGACY_NEFF_VAR = "NEURON_RT_ALLOW_LEGACY_NEFF"
ARCHITECTURE_DIR = ("info", "architecture")  # under each neuronN/: what the device is
# What the driver writes in device_name, and in instance_type (lower-cased), per instance family.
DEVICE_NAMES = {"Inferentia": "inf1", "Inferentia2": "inf2", "Trainium1": "trn1", "Trainium2": "trn2"}
INSTANCE_TYPES = {"inf1": "inf1", "inf2": "inf2", "trn1": "trn1", "trn2": "trn2"}
# NeuronCore generation per instance family (a Neuron binary runs on the generation it was compiled for).
CORE_GENERATION = {"inf1": 1, "inf2": 2, "trn1": 2, "trn2": 3}
# The --neuron-target that compiles for each host family; trn2 has none (no TensorFlow toolchain targets it).
NEURON_TARGET_FOR = {"inf1": "inf1", "inf2": "inf2", "trn1": "trn1"}
# A manifest's neuron.family (the toolchain: trn1 shares inf2's) as the hosts it was compiled for.
MODEL_HOSTS = {"inf1": "inf1", "inf2": "inf2/trn1"}

log = logging.getLogger("bertpool.neuron")


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


# ------------------------------------------------------------ NeuronCore generation

@dataclass(frozen=True)
class HostFamily:
    """What the Neuron driver says this host is."""

    family: str | None  # "inf1", "inf2", "trn1" or "trn2"; None: it could not be determined
    source: str  # the file it was read from, or why it could not be determined


def host_family(sysfs_root: str | os.PathLike) -> HostFamily:
    """The host's instance family from every device's architecture files (device_name, else
    instance_type); family None, with the reason, when there are none, a value is unknown, or the
    devices disagree. Never raises: what cannot be read is unknown, not an error."""
    root = Path(sysfs_root)
    devices = sorted((d for d in root.glob("neuron*") if re.fullmatch(r"neuron\d+", d.name)),
                     key=lambda d: int(d.name[6:])) if root.is_dir() else []
    if not devices:
        return HostFamily(None, f"no Neuron devices under {root} (no Neuron driver, or /sys not visible here)")
    found = [_device_family(device) for device in devices]
    unknown = next((f for f in found if f.family is None), None)
    if unknown is not None:
        return unknown
    if len({f.family for f in found}) > 1:
        return HostFamily(None, "the devices disagree: " + ", ".join(f"{f.source}: {f.family}" for f in found))
    return found[0]


def _device_family(device: Path) -> HostFamily:
    """One device's family from its device_name, else its instance_type."""
    arch = device.joinpath(*ARCHITECTURE_DIR)
    for name, table in (("device_name", DEVICE_NAMES), ("instance_type", INSTANCE_TYPES)):
        path = arch / name
        try:
            value = path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            continue  # absent (older driver): try the next file
        key = value.lower() if table is INSTANCE_TYPES else value
        if key in table:
            return HostFamily(table[key], f"{path}: {value}")
        return HostFamily(None, f"{path} says {value!r}, a Neuron device bertpool does not know")
    return HostFamily(None, f"{arch} has no device_name or instance_type (a Neuron driver that does not "
                            f"publish them there)")


def check_model_family(model_dir, model_family: str, distribution: str, sysfs_root: str | os.PathLike,
                       environ: dict) -> None:
    """ModelFormatError, naming both and the fix, when a model compiled for ``model_family``
    ("inf1" or "inf2", the manifest's neuron.family) cannot run on this host's NeuronCore
    generation. An unknown host family is logged (INFO) and let through: today's behaviour, never a
    guess. A binary for an older generation passes on a newer one where LEGACY_NEFF_VAR asks the
    runtime to allow it, except NeuronCore v1's, which no later runtime loads."""
    host = host_family(sysfs_root)
    if host.family is None:
        log.info("cannot check that %s (compiled for %s) suits this host's NeuronCores: %s",
                 model_dir, model_family, host.source)
        return
    want, have = CORE_GENERATION[model_family], CORE_GENERATION[host.family]  # trn1 models are family inf2
    if want == have:
        log.debug("%s: compiled for %s, and this host is %s (%s)", model_dir, model_family, host.family, host.source)
        return
    if 1 < want < have and _truthy(environ.get(LEGACY_NEFF_VAR)):
        log.info("%s was compiled for %s (NeuronCore v%d) and this host is %s (v%d); loading it as %s=%s asks",
                 model_dir, model_family, want, host.family, have, LEGACY_NEFF_VAR, environ[LEGACY_NEFF_VAR])
        return
    raise ModelFormatError(
        f"{model_dir} was compiled for {MODEL_HOSTS[model_family]} (NeuronCore v{want}, {distribution}), but this host is "
        f"{host.family} (NeuronCore v{have}; {host.source}); a Neuron binary runs only on the NeuronCore "
        f"generation it was compiled for. {_fix(model_family, host.family)}")


def _fix(model_family: str, host: str) -> str:
    """What to do about a model compiled for ``model_family`` on a ``host`` host."""
    target = NEURON_TARGET_FOR.get(host)
    if target is not None:
        return (f"Recompile it for this host: bertpool-compile --target neuron --neuron-target {target} (or "
                f"serve it on an {MODEL_HOSTS[model_family]} host)")
    legacy = (f", or set {LEGACY_NEFF_VAR}=TRUE to have the runtime try it (AWS: not every older binary runs)"
              if 1 < CORE_GENERATION[model_family] < CORE_GENERATION[host] else "")
    return (f"bertpool's Neuron toolchains compile for inf1, inf2 and trn1, not {host}: serve it on an "
            f"{MODEL_HOSTS[model_family]} host{legacy}")


def _truthy(value: str | None) -> bool:
    """The runtime's Boolean environment syntax (TRUE/FALSE; 1/0 too)."""
    return (value or "").strip().lower() in ("true", "1")
