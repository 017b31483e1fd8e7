"""Layering: medcore's torch-free base, weights, volumes and metrics import neither the trainer,
the CLI nor Lightning; and the check itself names what pulls them in."""

import pytest

from medcore.testing import assert_imports_stay_light

LIGHT = [
    "medcore.config",
    "medcore.errors",
    "medcore.io",
    "medcore.weights.checkpoint",
    "medcore.weights.keys",
    "medcore.weights.normalization",
    "medcore.weights.pretrained",
    "medcore.volumes.geometry",
    "medcore.volumes.nifti",
    "medcore.volumes.dicom",
    "medcore.volumes.reader",
    "medcore.volumes.store",
    "medcore.metrics",
]


def test_the_library_modules_import_no_training_machinery() -> None:
    assert_imports_stay_light(*LIGHT)


def test_a_module_that_pulls_in_the_trainer_is_named_with_its_import() -> None:
    with pytest.raises(AssertionError) as info:
        assert_imports_stay_light("medcore.config", "medcore.cli.stages")
    message = str(info.value)
    assert "'medcore.cli.stages'" in message and "'medcore.config'" not in message
    # stages imports run_setup, which imports medcore.engine (rng): the chain names the file
    assert "'medcore.cli': 'itself'" in message
