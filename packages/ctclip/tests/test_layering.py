"""Layering: importing the package's config and model (what building or loading a model needs)
pulls in neither the trainer, the CLI nor Lightning."""

from medcore.testing import assert_imports_stay_light


def test_config_and_model_import_no_training_machinery() -> None:
    assert_imports_stay_light("ctclip.config", "ctclip.model")
