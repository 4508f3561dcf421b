"""The embedded local Ray cluster (`ensure_ray` with no address) listens on loopback only:
its GCS address is 127.0.0.1 and every listening socket of its processes (GCS, raylet,
agents, workers) is bound to 127.0.0.1. Started in a child process of its own, so that
the sockets looked at are that cluster's and no other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, psutil, ray
from cluster.ray_env import ensure_ray

ensure_ray(num_cpus=1)

@ray.remote
def worker_ip():
    return ray.util.get_node_ip_address()

me = psutil.Process()
listening = []
for proc in [me] + me.children(recursive=True):
    try:
        listening += [[proc.name(), c.laddr.ip, c.laddr.port] for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass  # a worker that exited meanwhile
print("PROBE " + json.dumps({"gcs": ray.get_runtime_context().gcs_address, "worker_ip": ray.get(worker_ip.remote()),
                             "listening": listening}))
ray.shutdown()
"""


def test_embedded_cluster_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    probe = json.loads(lines[-1].removeprefix("PROBE "))
    assert probe["gcs"].startswith("127.0.0.1:"), probe["gcs"]
    assert probe["worker_ip"] == "127.0.0.1"
    names = {name for name, _, _ in probe["listening"]}
    assert {"gcs_server", "raylet"} <= names, probe["listening"]
    gcs_port = int(probe["gcs"].rpartition(":")[2])
    assert any(name == "gcs_server" and port == gcs_port for name, _, port in probe["listening"])
    exposed = [entry for entry in probe["listening"] if entry[1] not in ("127.0.0.1", "::ffff:127.0.0.1")]
    assert exposed == [], f"listening beyond loopback: {exposed}"
