"""Notebook 06's expert-parallel layer under torchrun: one node with two processes, and two
"nodes" on localhost joined by a c10d rendezvous on 127.0.0.1.

Each rank (`python -m moe_course.parallel_torchrun`) compares its outputs and gradients with
the single-process layer and writes `rank-<RANK>.json`; the test reads those files. The
torchrun commands are the ones docs/instructors.md and the module's docstring give, with
`torchrun` spelled `python -m torch.distributed.run` (the same program, this interpreter).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENTRY = ["-m", "moe_course.parallel_torchrun"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _results(out: Path, world_size: int) -> list[dict]:
    files = sorted(out.glob("rank-*.json"))
    assert [f.name for f in files] == [f"rank-{r}.json" for r in range(world_size)]
    results = [json.loads(f.read_text()) for f in files]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world_size"] == world_size, res
        assert res["cases"] == 4
        assert res["passed"] and res["all_passed"], res
        assert set(res["max_abs_diff"]) == {"y", "y_fn", "x_grad", "gate_grad", "expert_grads"}
        assert all(d <= res["atol"] for d in res["max_abs_diff"].values()), res
    return results


def test_torchrun_standalone_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ep-check"
    done = subprocess.run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", *ENTRY,
                           "--out", str(out)], capture_output=True, text=True, env=_env(),
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    results = _results(out, 2)
    assert sorted(r["local_rank"] for r in results) == [0, 1]
    assert len({r["pid"] for r in results}) == 2


def test_torchrun_two_nodes_on_localhost(tmp_path: Path) -> None:
    out = tmp_path / "ep-check"
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(node), "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", endpoint, *ENTRY, "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(), cwd=tmp_path) for node in (0, 1)]
    logs = []
    try:
        for proc in nodes:
            logs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in nodes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(logs)
    results = _results(out, 2)
    # one process per "node": two agents, each with its own node (group) rank
    assert sorted(r["node_rank"] for r in results) == [0, 1]
    assert [r["local_rank"] for r in results] == [0, 0]
