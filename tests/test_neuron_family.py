"""Which NeuronCore generation the host has, read from the Neuron driver's sysfs files, and the refusal of
a model compiled for another one (workers/neuron_cores.py). No TensorFlow, no device: the driver's
files are faked in a directory, with the values the driver writes (aws-neuron-driver
v1/v2/v3 neuron_dhal_v*.c: device_name Inferentia, Inferentia2, Trainium1, Trainium2; instance_type
Inf1, Inf2, Trn1, Trn2). The load path itself is tested with the fake Neuron packages in test_neuron.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bertpool.common.errors import ModelFormatError
from bertpool.workers.neuron_cores import check_model_family, host_family

DEVICE_NAMES = {"inf1": "Inferentia", "inf2": "Inferentia2", "trn1": "Trainium1", "trn2": "Trainium2"}


def driver_files(root: Path, devices: int, **architecture: str) -> Path:
    """``devices`` neuronN/ directories with a core_count and info/architecture/<name> = value."""
    for index in range(devices):
        device = root / f"neuron{index}"
        (device / "info" / "architecture").mkdir(parents=True)
        (device / "core_count").write_text("2\n")
        for name, value in architecture.items():
            (device / "info" / "architecture" / name).write_text(f"{value}\n")
    return root


@pytest.mark.parametrize("family", sorted(DEVICE_NAMES))
def test_host_family_from_the_device_name(tmp_path, family):
    found = host_family(driver_files(tmp_path, 2, device_name=DEVICE_NAMES[family], instance_type="Trn1"))
    assert found.family == family  # device_name first; instance_type only where it is absent
    assert found.source == f"{tmp_path}/neuron0/info/architecture/device_name: {DEVICE_NAMES[family]}"


def test_host_family_from_the_instance_type_where_there_is_no_device_name(tmp_path):
    assert host_family(driver_files(tmp_path, 1, instance_type="Inf2")).family == "inf2"


@pytest.mark.parametrize("setup, reason", [
    (lambda root: root / "absent", "no Neuron devices under"),
    (lambda root: driver_files(root, 1), "has no device_name or instance_type"),          # an older driver
    (lambda root: driver_files(root, 1, device_name="Trainium3"), "says 'Trainium3', a Neuron device"),
    (lambda root: driver_files(root, 1, device_name="inferentia2"), "says 'inferentia2'"),  # not guessed at
])
def test_host_family_unknown_says_why(tmp_path, setup, reason):
    found = host_family(setup(tmp_path))
    assert found.family is None and reason in found.source


def test_host_family_unknown_where_devices_disagree(tmp_path):
    driver_files(tmp_path, 2, device_name="Inferentia2")
    (tmp_path / "neuron1" / "info" / "architecture" / "device_name").write_text("Inferentia\n")
    found = host_family(tmp_path)
    assert found.family is None and found.source.startswith("the devices disagree")


@pytest.mark.parametrize("model, host", [("inf1", "inf1"), ("inf2", "inf2"), ("inf2", "trn1")])
def test_a_model_for_the_hosts_generation_passes(tmp_path, model, host):
    check_model_family("m", model, "pkg", driver_files(tmp_path, 1, device_name=DEVICE_NAMES[host]), {})


@pytest.mark.parametrize("model, host, message", [
    ("inf1", "inf2", r"m was compiled for inf1 \(NeuronCore v1, tensorflow-neuron\), but this host is inf2 "
                     r"\(NeuronCore v2; .*device_name: Inferentia2\); a Neuron binary runs only on the NeuronCore "
                     r"generation it was compiled for\. Recompile it for this host: bertpool-compile --target "
                     r"neuron --neuron-target inf2 \(or serve it on an inf1 host\)"),
    ("inf1", "trn1", r"but this host is trn1 .*--neuron-target trn1 \(or serve it on an inf1 host\)"),
    ("inf2", "inf1", r"m was compiled for inf2/trn1 \(NeuronCore v2, tensorflow-neuronx\), but this host is inf1 "
                     r"\(NeuronCore v1; .*--neuron-target inf1 \(or serve it on an inf2/trn1 host\)"),
    ("inf2", "trn2", r"not trn2: serve it on an inf2/trn1 host, or set NEURON_RT_ALLOW_LEGACY_NEFF=TRUE"),
    ("inf1", "trn2", r"not trn2: serve it on an inf1 host$"),
])
def test_a_model_for_another_generation_is_refused_naming_both_and_the_fix(tmp_path, model, host, message):
    package = {"inf1": "tensorflow-neuron", "inf2": "tensorflow-neuronx"}[model]
    with pytest.raises(ModelFormatError, match=message):
        check_model_family("m", model, package, driver_files(tmp_path, 1, device_name=DEVICE_NAMES[host]), {})


def test_the_runtimes_legacy_opt_in_lets_an_older_v2_binary_through_never_a_v1_one(tmp_path, caplog):
    sysfs = driver_files(tmp_path, 1, device_name="Trainium2")
    with caplog.at_level(logging.INFO, logger="bertpool.neuron"):
        check_model_family("m", "inf2", "pkg", sysfs, {"NEURON_RT_ALLOW_LEGACY_NEFF": "TRUE"})
    assert "loading it as NEURON_RT_ALLOW_LEGACY_NEFF=TRUE asks" in caplog.text
    with pytest.raises(ModelFormatError, match="compiled for inf1"):
        check_model_family("m", "inf1", "pkg", sysfs, {"NEURON_RT_ALLOW_LEGACY_NEFF": "TRUE"})
    with pytest.raises(ModelFormatError, match="compiled for inf2/trn1"):  # the opt-in is only the runtime's
        check_model_family("m", "inf2", "pkg", sysfs, {"NEURON_RT_ALLOW_LEGACY_NEFF": "FALSE"})


def test_an_unknown_host_is_let_through_and_logged_never_guessed(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="bertpool.neuron"):
        check_model_family("m", "inf1", "pkg", tmp_path / "no-driver", {})
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert f"cannot check that m (compiled for inf1) suits this host's NeuronCores: no Neuron devices under " \
           f"{tmp_path}/no-driver" in caplog.text
