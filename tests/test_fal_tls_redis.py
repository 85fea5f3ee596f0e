"""The zero-code-change path: the server on TLS with a private CA, fal_client configured only by
environment variables, and the request store on a real redis-server."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import textwrap

import httpx
import pytest

from tests.certs import write_private_ca_and_server_cert
from tests.harness import running_serve, tiny_env
from tests.queue_helpers import assert_records_survive_ingress_kill

KEY = "tls-test-key"


@pytest.fixture(scope="module")
def tls_server(tiny_root, tmp_path_factory, redis_url):
    ca, cert, key = write_private_ca_and_server_cert(tmp_path_factory.mktemp("tls"))
    env = tiny_env(tiny_root, tmp_path_factory.mktemp("state"), SRPO_REDIS_URL=redis_url,
                   SRPO_QUEUE_CONCURRENCY="1", SRPO_QUEUE_LEASE_S="3")
    args = {"text_batch_wait_s": 0.0, "decode_batch_wait_s": 0.0}
    with running_serve(env, args, tls=(cert, key, ca), secrets={"SRPO_API_KEYS": json.dumps([KEY])}) as base:
        yield base, ca


CLIENT_SCRIPT = textwrap.dedent("""
    import json, fal_client
    updates = []
    out = fal_client.subscribe("fal-ai/flux/srpo", with_logs=True, on_queue_update=updates.append,
                               arguments={"prompt": "a harbour", "image_size": "square", "num_inference_steps": 3})
    ran = fal_client.run("fal-ai/flux/srpo", arguments={"prompt": "a harbour", "num_inference_steps": 2})
    print(json.dumps({"kinds": [type(u).__name__ for u in updates], "logs": [e["message"] for e in updates[-1].logs],
                      "size": [out["images"][0]["width"], out["images"][0]["height"]],
                      "run_url": ran["images"][0]["url"]}))
""")


def test_fal_client_works_with_only_environment_variables(tls_server):
    base, ca = tls_server
    host = base.removeprefix("https://")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "SRPO_"))}
    env |= {"FAL_RUN_HOST": host, "FAL_QUEUE_RUN_HOST": f"{host}/queue", "SSL_CERT_FILE": str(ca), "FAL_KEY": KEY}
    run = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["kinds"][-1] == "Completed"
    assert [m for m in out["logs"] if m.startswith("step ")] == ["step 1/3", "step 2/3", "step 3/3"]
    assert out["size"] == [512, 512]
    assert out["run_url"].startswith(f"{base}/files/")


def test_plain_http_is_not_served_and_an_untrusted_client_fails(tls_server):
    base, _ = tls_server
    with pytest.raises(httpx.HTTPError):
        httpx.get(base.replace("https://", "http://") + "/health", timeout=5)
    with pytest.raises(httpx.ConnectError):  # the system trust store does not know the private CA
        httpx.get(f"{base}/health", timeout=5)


def test_records_in_redis_survive_killing_the_ingress_replica(tls_server):
    base, ca = tls_server
    verify = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(base_url=base, verify=verify, headers={"Authorization": f"Key {KEY}"}, timeout=30) as client:
        assert_records_survive_ingress_kill(client)
