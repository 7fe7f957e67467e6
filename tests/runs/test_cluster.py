"""The cluster path (`--ray-address`), exercised the way a user runs it (issue 17 §4).

A real two-node Ray cluster on this machine: `ray start --head` (own temp dir, explicit CPUs, no dashboard)
and a second node joining it with `ray start --address`. `wam eval` and a two-worker `wam pretrain` run
against it through the CLI, in subprocesses as a user would, and must equal the same commands in a local
Ray session. The cluster is stopped at the end (`ray stop`, which stops every Ray process of this machine:
the test runs alone, `slow`).
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray >= 2.5x turns token authentication on for clusters started with `ray start --head`; a joining node and
# every driver must present the same token (docs/distributed.md). One token for this test's processes.
TOKEN = secrets.token_hex(16)


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "WAM_TENSORBOARD": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": TOKEN}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _wam(*args: object) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "wam.runs.cli", *map(str, args)])


@pytest.fixture
def cluster():
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="wamcl-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    common = ["--num-cpus=1", "--disable-usage-stats", "--system-config", json.dumps({"worker_niceness": 0})]
    try:
        _run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={tmp}",
              *common])
        _run([RAY, "start", f"--address=127.0.0.1:{port}", *common[:2]])
        address = f"127.0.0.1:{port}"
        probe = (f"import ray, time\nray.init(address='{address}', log_to_driver=False)\n"
                 "for _ in range(60):\n"
                 "    if len([n for n in ray.nodes() if n['Alive']]) == 2: break\n"
                 "    time.sleep(1)\n"
                 "print(len([n for n in ray.nodes() if n['Alive']]), ray.cluster_resources().get('CPU'))")
        nodes, cpus = _run([sys.executable, "-c", probe]).stdout.split()[-2:]
        assert (int(nodes), float(cpus)) == (2, 2.0), f"expected 2 nodes of 1 CPU, got {nodes} nodes, {cpus} CPUs"
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120,
                       env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN})
        shutil.rmtree(tmp, ignore_errors=True)


def _episodes(out: Path) -> list[tuple]:
    with open(out / "episodes.csv") as f:
        return sorted((r["game"], r["episode"], r["return"], r["length"]) for r in csv.DictReader(f))


def test_eval_and_two_worker_pretrain_on_a_cluster_equal_a_local_session(cluster, tmp_path):
    ev = ["eval", "--agent", "random", "--game", "Pong", "--episodes", 2, "--workers", 2, "--max-steps", 40,
          "--seed", 3, "--no-progress"]
    _wam(*ev, "--out", tmp_path / "eval-local")
    _wam(*ev, "--ray-address", cluster, "--out", tmp_path / "eval-cluster")
    local, remote = _episodes(tmp_path / "eval-local"), _episodes(tmp_path / "eval-cluster")
    assert len(local) == 2 and local == remote

    pre = ["pretrain", "--preset", "debug", "--data", "synthetic", "--steps", 2, "--batch-size", 4, "--seed", 0,
           "--workers", 2, "--no-progress"]
    _wam(*pre, "--out", tmp_path / "pre-local")
    _wam(*pre, "--ray-address", cluster, "--out", tmp_path / "pre-cluster")
    from wam.worldmodel.checkpoint import RunDir, load_checkpoint

    a = load_checkpoint(tmp_path / "pre-local", kind="world-action-model")
    b = load_checkpoint(tmp_path / "pre-cluster", kind="world-action-model")
    assert a["step"] == b["step"] == 2 and len(b["sampler"]) == 2, "two ranks, each with its own data stream"
    for k, v in a["model"].items():  # same seeds, same streams; only the thread count may differ (rounding)
        torch.testing.assert_close(b["model"][k], v, atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    la, lb = (RunDir(tmp_path / r).read_metrics()[-1]["loss"] for r in ("pre-local", "pre-cluster"))
    assert lb == pytest.approx(la, rel=1e-4)
