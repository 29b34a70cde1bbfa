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
        if s.default is None:  # TLS and token files: see test_security_settings_* below
            continue
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


@pytest.mark.e2e
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


def test_warm_up_and_acceptance_are_flags_and_environment_variables_too(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("detectors:\n  warmup_windows: 12\n  accept_windows: 200\n  latency:\n    threshold: 9.5\n")
    cfg = load_config(["--config", str(f), "--warmup-windows", "5"], environ={"BACKFLOW_ACCEPT_WINDOWS": "60"})
    assert (cfg.detectors.warmup_windows, cfg.detectors.accept_windows) == (5, 60)  # flag, env over YAML
    assert cfg.detectors.latency.threshold == 9.5  # the rest of the section stays
    assert load_config(["--config", str(f)], environ={}).detectors.warmup_windows == 12
    with pytest.raises(ConfigError, match=r"detectors.warmup_windows \(--warmup-windows\)"):
        load_config(["--warmup-windows", "0"], environ={})
    with pytest.raises(ConfigError, match="BACKFLOW_WARMUP_WINDOWS"):
        load_config([], environ={"BACKFLOW_WARMUP_WINDOWS": "soon"})


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


# --- security settings (TLS files, bearer token, Redis URL) ---------------------------------

@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    from tests.tlsfiles import CA
    d = tmp_path_factory.mktemp("tls")
    ca = CA(d)
    return {"ca": ca.cert, "server": ca.issue("server"), "other": ca.issue("other"), "dir": d}


def test_security_settings_come_from_flags_env_and_yaml(tls, tmp_path):
    server = tls["server"]
    f = tmp_path / "c.yaml"
    f.write_text(f"tls_client_ca: {tls['ca']}\n")
    cfg = load_config(["--tls-cert", str(server.cert), "--config", str(f)],
                      environ={"BACKFLOW_TLS_KEY": str(server.key), "BACKFLOW_AUTH_TOKEN": "t0ken-from-env"})
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) == (str(server.cert), str(server.key), str(tls["ca"]))
    assert cfg.auth_token == "t0ken-from-env"
    assert "t0ken-from-env" not in repr(cfg)
    assert load_config([], environ={}).auth_token is None


def test_token_file_is_read_and_stripped(tmp_path):
    f = tmp_path / "token"
    f.write_text("  s3cret-token\n")
    cfg = load_config([], environ={"BACKFLOW_AUTH_TOKEN_FILE": str(f)})
    assert (cfg.auth_token, cfg.auth_token_file) == ("s3cret-token", str(f))
    assert "s3cret-token" in cfg.secrets


def _config_error(argv, environ=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(argv, environ=environ or {})
    return str(e.value)


def test_tls_cert_and_key_go_together(tls):
    server = tls["server"]
    assert _config_error(["--tls-cert", str(server.cert)]) == \
        "invalid setting tls_key: tls_cert (--tls-cert) is set but tls_key is not; give both or neither"
    assert _config_error([], {"BACKFLOW_TLS_KEY": str(server.key)}) == \
        "invalid setting tls_cert: tls_key (BACKFLOW_TLS_KEY) is set but tls_cert is not; give both or neither"
    msg = _config_error(["--tls-client-ca", str(tls["ca"])])
    assert msg.startswith("invalid setting tls_client_ca (--tls-client-ca): mutual TLS needs tls_cert")


@pytest.mark.parametrize("which,content,named", [
    ("cert", "not a certificate", "invalid setting tls_cert (--tls-cert): no PEM certificate"),
    ("key", "not a key", "invalid setting tls_key (--tls-key): "),
    ("ca", "", "invalid setting tls_client_ca (--tls-client-ca): no PEM certificate"),
])
def test_unusable_tls_files_are_named(tls, tmp_path, which, content, named):
    server = tls["server"]
    files = {"cert": str(server.cert), "key": str(server.key), "ca": str(tls["ca"])}
    bad = tmp_path / "bad.pem"
    bad.write_text(content)
    files[which] = str(bad)
    assert named in _config_error(["--tls-cert", files["cert"], "--tls-key", files["key"],
                                   "--tls-client-ca", files["ca"]])


def test_tls_key_of_another_certificate_or_encrypted_is_refused(tls, tmp_path):
    from cryptography.hazmat.primitives import serialization
    server, other = tls["server"], tls["other"]
    msg = _config_error(["--tls-cert", str(server.cert), "--tls-key", str(other.key)])
    assert msg.startswith("invalid setting tls_key (--tls-key)") and "does not belong to tls_cert" in msg
    key = serialization.load_pem_private_key(server.key.read_bytes(), None)
    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"passphrase")))
    msg = _config_error(["--tls-cert", str(server.cert), "--tls-key", str(encrypted)])
    assert msg.startswith("invalid setting tls_key") and "encrypted" in msg


AGGREGATE = ["--role", "aggregate", "--forward", "detect:4317"]


def test_forward_tls_and_token_are_an_aggregate_replicas_and_checked_like_the_receivers(tls, tmp_path):
    server, other, ca = tls["server"], tls["other"], str(tls["ca"])
    token = tmp_path / "token"
    token.write_text("fw-s3cret\n")
    cfg = load_config([*AGGREGATE, "--forward-tls-ca", ca, "--forward-tls-cert", str(server.cert),
                       "--forward-tls-key", str(server.key)], environ={"BACKFLOW_FORWARD_AUTH_TOKEN_FILE": str(token)})
    assert (cfg.forward_tls_ca, cfg.forward_tls_cert, cfg.forward_auth_token) == (ca, str(server.cert), "fw-s3cret")
    assert "fw-s3cret" in cfg.secrets and "fw-s3cret" not in repr(cfg)
    assert _config_error(["--forward-tls-ca", ca]) == \
        "invalid setting forward_tls_ca (--forward-tls-ca): only an aggregate replica forwards; role is both"
    assert _config_error(["--role", "detect"], {"BACKFLOW_FORWARD_AUTH_TOKEN": "t"}).startswith(
        "invalid setting forward_auth_token (BACKFLOW_FORWARD_AUTH_TOKEN): only an aggregate replica forwards")
    assert _config_error(["--forward-tls-cert", str(server.cert), "--forward-tls-key", str(server.key)]).startswith(
        "invalid setting forward_tls_cert (--forward-tls-cert): only an aggregate replica forwards")
    assert _config_error([*AGGREGATE, "--forward-tls-cert", str(server.cert), "--forward-tls-key", str(server.key)]) \
        .startswith("invalid setting forward_tls_cert (--forward-tls-cert): a client certificate is sent over TLS")
    assert _config_error([*AGGREGATE, "--forward-tls-ca", ca, "--forward-tls-cert", str(server.cert)]) == \
        "invalid setting forward_tls_key: forward_tls_cert (--forward-tls-cert) is set but forward_tls_key is " \
        "not; give both or neither"
    msg = _config_error([*AGGREGATE, "--forward-tls-ca", ca, "--forward-tls-cert", str(server.cert),
                         "--forward-tls-key", str(other.key)])
    assert msg.startswith("invalid setting forward_tls_key (--forward-tls-key)") and "forward_tls_cert" in msg
    assert _config_error([*AGGREGATE, "--forward-tls-ca", str(token)]).startswith(
        "invalid setting forward_tls_ca (--forward-tls-ca): no PEM certificate")
    assert _config_error([*AGGREGATE, "--forward-auth-token", "t"], {"BACKFLOW_FORWARD_AUTH_TOKEN_FILE": str(token)}) \
        == "invalid setting forward_auth_token_file (BACKFLOW_FORWARD_AUTH_TOKEN_FILE): forward_auth_token is set " \
           "as well; give one of them"


def test_missing_tls_file_is_named():
    msg = _config_error([], {"BACKFLOW_TLS_CERT": "/nonexistent/cert.pem"})
    assert msg == "invalid setting tls_cert (BACKFLOW_TLS_CERT): cannot read '/nonexistent/cert.pem': " \
                  "No such file or directory"


@pytest.mark.parametrize("token", ["two words", "tab\there", "caf\u00e9-s3cret"])
def test_bad_token_is_refused_without_showing_it(token):
    msg = _config_error(["--auth-token", token])
    assert msg.startswith("invalid setting auth_token (--auth-token)")
    assert token not in msg and "s3cret" not in msg


def test_token_and_token_file_together_or_an_empty_file_are_refused(tmp_path):
    f = tmp_path / "token"
    f.write_text("from-the-file")
    msg = _config_error(["--auth-token-file", str(f)], {"BACKFLOW_AUTH_TOKEN": "x-token"})
    assert msg.startswith("invalid setting auth_token_file (--auth-token-file): auth_token is set as well")
    f.write_text("\n")
    assert "auth_token_file (--auth-token-file)" in _config_error(["--auth-token-file", str(f)])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("auth_token:\n")  # YAML null is no token, not the string "None"
    assert "invalid setting auth_token" in _config_error(["--config", str(yaml_file)])


@pytest.mark.parametrize("url,named", [
    ("http://bf:pw-s3cret@redis:6379/0", "scheme must be"),
    ("redis://:pw-s3cret@:6379/0", "no host"),
    ("redis://:pw-s3cret@redis:port/0", "bad port"),
    ("redis://:pw-s3cret@redis:6379/0?bogus=1", "bogus"),
    ("redis://:pw-s3cret@redis:6379/0?ssl_ca_certs=/etc/hosts", "ssl_ca_certs"),  # needs rediss://
    ("rediss://:pw-s3cret@redis:6379/0?ssl_cert_reqs=maybe", "maybe"),
    ("rediss://redis:6379/0?ssl_ca_certs=/nonexistent/ca.pem&password=pw-s3cret", "cannot read ssl_ca_certs"),
])
def test_bad_redis_url_is_named_without_its_password(url, named):
    msg = _config_error(["--redis-url", url])
    assert msg.startswith("invalid setting redis_url (--redis-url)") and named in msg
    assert "pw-s3cret" not in msg


def test_redis_url_takes_tls_files_and_a_user(tls):
    url = f"rediss://bf:pw@127.0.0.1:6380/0?ssl_ca_certs={tls['ca']}&ssl_cert_reqs=required"
    cfg = load_config(["--redis-url", url], environ={})
    assert cfg.redis_url == url
    assert set(cfg.secrets) == {"pw"}
    assert "pw@" not in repr(cfg)


def test_url_secrets_include_encoded_and_query_passwords():
    from processor.config import url_secrets
    assert url_secrets("redis://u:p%40ss@h:1/0?ssl_password=k3y") == ["p%40ss", "k3y", "p@ss", "k3y"]


@pytest.mark.e2e
def test_help_and_start_error_do_not_echo_secrets():
    p = subprocess.run([sys.executable, "-m", "processor", "serve", "--auth-token", "bad token-s3cret"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "auth_token" in p.stderr and "s3cret" not in p.stderr
