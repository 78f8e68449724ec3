"""examples/node, the Node.js client built from the .proto alone, against a real
server: plaintext with a token, and TLS with a token. Needs node and npm (its
packages are installed with ``npm ci`` the first time)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from tls_certs import make_certs

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"
TOKEN = "client-node-0123456789"


@pytest.fixture(scope="module")
def node_example():
    assert shutil.which("node") and shutil.which("npm"), "the Node example test needs node and npm"
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, check=True,
                       capture_output=True, timeout=300)  # fmt: skip
    return EXAMPLE


def run_client(example, port, **env):
    result = subprocess.run(
        ["node", "client.js"],
        cwd=example,
        env={**os.environ, "RECSVC_TARGET": f"localhost:{port}", "RECSVC_USER": "u1", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result


@pytest.mark.parametrize("tls", [False, True])
def test_node_client(make_server, node_example, tmp_path, tls):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"client {TOKEN} node\n")
    settings = {"auth_tokens_file": tokens}
    env = {"RECSVC_TOKEN": TOKEN}
    if tls:
        certs = make_certs(tmp_path / "certs")
        settings.update(tls_cert=certs["server.pem"], tls_key=certs["server.key"])
        env["RECSVC_TLS_CA"] = str(certs["ca.pem"])
    server = make_server(**settings)
    result = run_client(node_example, server.port, **env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert len(summary["recommended"]) == 5 and summary["send_feedback"]["accepted"] == 1
    assert summary["stream_acked"] == 5 and len(summary["stream_duplicates"]) == 1
    assert "received 0" in summary["stream_rejected"][0]["reason"]
    assert summary["personalized_after"] is True
    # without the token the server refuses, and the client says why
    result = run_client(node_example, server.port, **{**env, "RECSVC_TOKEN": ""})
    assert result.returncode == 1 and "UNAUTHENTICATED" in result.stderr
