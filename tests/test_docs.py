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
