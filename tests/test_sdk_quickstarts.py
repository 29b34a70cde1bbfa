"""The quickstarts of docs/sdks.md, run as a user would: docs/examples/quickstart.py with the
Python SDK and docs/examples/quickstart.js with the JS SDK 2.x (tests/js/node_modules, from
npm), configured only by the OTEL_ environment variables, against a real backflow serve."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
NODE_MODULES = ROOT / "tests" / "js" / "node_modules"


def test_the_guide_shows_the_examples_as_they_are():
    guide = (ROOT / "docs" / "sdks.md").read_text()
    blocks = re.findall(r"```(?:python|js)\n(.*?)```", guide, re.S)
    for name in ("quickstart.py", "quickstart.js"):
        assert (EXAMPLES / name).read_text() in blocks, f"docs/sdks.md does not show docs/examples/{name} as it is"


@pytest.mark.e2e
def test_the_python_and_node_quickstarts_key_spans_by_code_location(backflow, redis_client):
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "@opentelemetry" / "resources").is_dir():
        pytest.fail("needs Node.js and tests/js/node_modules: run `make node-deps`")
    redis_client.flushall()
    bf = backflow("--window", "1", "--allowed-lateness", "0")
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{bf.grpc_target}", "OTEL_TRACES_EXPORTER": "otlp",
           "OTEL_RESOURCE_ATTRIBUTES": "service.version=1.4.0,deployment.environment.name=staging"}
    for cmd, service, extra in [([sys.executable, str(EXAMPLES / "quickstart.py")], "shop-py", {}),
                                ([node, str(EXAMPLES / "quickstart.js")], "shop-js", {"NODE_PATH": str(NODE_MODULES)})]:
        p = subprocess.run(cmd, env={**env, "OTEL_SERVICE_NAME": service, **extra}, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, p.stderr
    bf.wait_for(lambda: bf.metrics().get("backflow_processed_spans_total") == 80, what="80 spans processed")
    assert bf.stop() == 0
    seen = {(f["service.name"], f["deployment.environment.name"], f["service.version"], f["code.function.name"],
             os.path.basename(f["code.file.path"]), f["code.line.number"] != "")
            for _, f in redis_client.xrange("backflow:events") if f["type"] == "first_seen"}
    assert seen == {
        ("shop-py", "staging", "1.4.0", "quickstart.apply_discount", "quickstart.py", True),
        ("shop-py", "staging", "1.4.0", "quickstart.checkout", "quickstart.py", True),
        ("shop-js", "staging", "1.4.0", "shop.cart.applyDiscount", "quickstart.js", True),
        ("shop-js", "staging", "1.4.0", "shop.cart.checkout", "quickstart.js", True),
    }
