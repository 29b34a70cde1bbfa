"""The docs say what the code does."""

import re
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
    from processor.detect.registry import reference_markdown as detector_reference

    text = (ROOT / "docs" / "detection.md").read_text()
    assert detector_reference() in text, "regenerate with: python -m processor.detect.registry"


def test_configuration_reference_names_every_option_of_backflow_serve():
    from processor.cli import _parser

    text = (ROOT / "docs" / "configuration.md").read_text()
    serve = next(a for a in _parser()._subparsers._group_actions if a.choices).choices["serve"]
    options = [o for a in serve._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert "--config" in options and len(options) > 20
    for option in options:
        assert f"`{option} " in text, f"{option} is not in docs/configuration.md"
    assert "`BACKFLOW_CONFIG`" in text


def test_configuration_reference_points_at_the_detector_settings():
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert "(detection.md#settings)" in text
    assert "\n## Settings\n" in (ROOT / "docs" / "detection.md").read_text()


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_of_the_docs_point_at_files_that_exist():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def test_deployment_docs_link_every_file_under_deploy():
    text = (ROOT / "docs" / "deployment.md").read_text()
    linked = {(ROOT / "docs" / t).resolve() for t in LINK.findall(text)}
    for path in sorted((ROOT / "deploy").rglob("*")):
        if path.is_file():
            assert path in linked, f"docs/deployment.md does not link {path.relative_to(ROOT)}"


def test_every_make_target_the_readme_names_exists():
    import re

    readme = (ROOT / "README.md").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = set(re.findall(r"\bmake ([a-z][a-z-]*)", readme))
    assert {"run", "test", "tail", "top"} <= named
    assert named <= targets, named - targets


def test_the_package_metadata_installs_without_deprecation_warnings():
    # setuptools 77 deprecated the license table: installing printed a warning to every user
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(meta["project"]["license"], str)
    assert any(r.startswith("setuptools>=77") for r in meta["build-system"]["requires"])
    assert not any(c.startswith("License ::") for c in meta["project"].get("classifiers", []))
