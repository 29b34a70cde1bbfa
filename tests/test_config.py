"""Settings: precedence flag > env > YAML > default; a bad one stops the start, named."""

import subprocess
import sys

import pytest

from processor.cli import main
from processor.config import SETTINGS, ConfigError, load_config


def test_defaults_are_the_contract_defaults():
    cfg = load_config([], environ={})
    assert (cfg.otlp_grpc, cfg.otlp_http, cfg.metrics) == ("0.0.0.0:4317", "0.0.0.0:4318", "0.0.0.0:9464")
    assert (cfg.redis_url, cfg.prefix, cfg.window) == ("redis://localhost:6379/0", "backflow", 60.0)
    assert cfg.max_request_bytes == 4 * 1024 * 1024


def test_flag_beats_env_beats_yaml_beats_default(tmp_path):
    f = tmp_path / "backflow.yaml"
    f.write_text("window: 30\nprefix: from_yaml\nexemplars: 5\nallowed-lateness: 2\n")
    env = {"BACKFLOW_CONFIG": str(f), "BACKFLOW_PREFIX": "from_env", "BACKFLOW_WINDOW": "20"}
    cfg = load_config(["--window", "10"], environ=env)
    assert cfg.window == 10.0           # flag
    assert cfg.prefix == "from_env"     # env over YAML
    assert cfg.exemplars == 5           # YAML over default
    assert cfg.allowed_lateness == 2.0  # YAML keys may use dashes like the flags
    assert cfg.events_maxlen == 100_000  # default


def test_every_setting_has_a_flag_and_an_env_name():
    for s in SETTINGS:
        cfg = load_config([], environ={s.env: str(s.default)})
        assert getattr(cfg, s.name) == s.parse(s.default)


@pytest.mark.parametrize("argv,env,yaml_text,named", [
    (["--window", "-1"], {}, None, "window (--window)"),
    (["--window", "abc"], {}, None, "window (--window)"),
    (["--otlp-grpc", "localhost"], {}, None, "otlp_grpc (--otlp-grpc)"),
    (["--metrics", "0.0.0.0:99999"], {}, None, "metrics (--metrics)"),
    (["--redis-url", "http://x"], {}, None, "redis_url (--redis-url)"),
    ([], {"BACKFLOW_WINDOW": "0"}, None, "window (BACKFLOW_WINDOW)"),
    ([], {}, "window: -5\n", "window (window in"),
    ([], {}, "windw: 5\n", "unknown key 'windw'"),
    ([], {}, "[1, 2]\n", "must hold a mapping"),
    ([], {}, "window: [\n", "not valid YAML"),
])
def test_bad_setting_is_named(tmp_path, argv, env, yaml_text, named):
    if yaml_text is not None:
        f = tmp_path / "c.yaml"
        f.write_text(yaml_text)
        argv = argv + ["--config", str(f)]
    with pytest.raises(ConfigError, match=r".*" + __import__("re").escape(named)):
        load_config(argv, environ=env)


def test_bad_setting_exits_with_status_2_and_one_line(capsys):
    assert main(["serve", "--window", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "window" in err and "-1" in err


def test_console_script_exits_2_on_unknown_yaml_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("otlp_grpc: 127.0.0.1:4317\nbogus: 1\n")
    p = subprocess.run([sys.executable, "-m", "processor", "serve", "--config", str(f)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "unknown key 'bogus'" in p.stderr


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(["--config", "/nonexistent/backflow.yaml"], environ={})


def test_detector_settings_come_from_the_yaml_detectors_section(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("detectors:\n  warmup_windows: 12\n  latency:\n    threshold: 9.5\n  dormant:\n    enabled: false\n")
    cfg = load_config(["--config", str(f)], environ={})
    assert cfg.detectors.warmup_windows == 12
    assert cfg.detectors.latency.threshold == 9.5
    assert cfg.detectors.dormant.enabled is False
    assert cfg.detectors.errors.ratio == 3.0  # default


@pytest.mark.parametrize("yaml_text,named", [
    ("detectors:\n  latency:\n    treshold: 3\n", "unknown key 'detectors.latency.treshold'"),
    ("detectors:\n  latency:\n    threshold: -3\n", "detectors.latency.threshold"),
    ("detectors:\n  errors:\n    alpha: 2\n", "detectors.errors.alpha"),
    ("detectors:\n  latency: 5\n", "detectors.latency"),
    ("detectors: [1]\n", "detectors"),
])
def test_bad_detector_setting_is_named(tmp_path, yaml_text, named):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError, match=__import__("re").escape(named)):
        load_config(["--config", str(f)], environ={})
