"""The docs say what the code does."""

from pathlib import Path

from processor.config import reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_matches_the_config_object():
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert reference_markdown() in text, "regenerate with: python -m processor.config"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci


def test_detection_settings_reference_matches_the_settings_table():
    from processor.detect.settings import reference_markdown as detector_reference

    text = (ROOT / "docs" / "detection.md").read_text()
    assert detector_reference() in text, "regenerate with: python -m processor.detect.settings"
