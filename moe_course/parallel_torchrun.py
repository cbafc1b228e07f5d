"""Notebook 06's expert-parallel layer under `torchrun`, checked against one process.

On one machine, two processes:

    torchrun --standalone --nproc-per-node 2 -m moe_course.parallel_torchrun --out ep-check

On two machines (run the same command on each, with its own `--node-rank`; HOST:PORT is a
free port on the first machine, reachable from the second):

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --rdzv-backend c10d \
        --rdzv-endpoint HOST:PORT -m moe_course.parallel_torchrun --out ep-check
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 1 --rdzv-backend c10d \
        --rdzv-endpoint HOST:PORT -m moe_course.parallel_torchrun --out ep-check

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, GROUP_RANK and MASTER_ADDR/MASTER_PORT; this
module joins the process group from them (`init_process_group(backend, init_method="env://")`,
gloo on CPU), runs `moe_course.parallel_workers.expert_parallel_worker` (the layer
`ExpertParallelMoE` and the function `expert_parallel_forward` on this rank's tokens, with
the loss `sum(y * target)` backpropagated through both all-to-alls), and compares on every
rank with the single-process `MoEFeedForward` it was sharded from: the outputs of this rank's
tokens, their input gradients, this rank's experts' weight gradients, and the router's
gradient summed over ranks (`all_reduce`, as data parallelism does). Each rank writes
`OUT/rank-<RANK>.json` with the largest differences and `passed`; the exit status is 0 only
when every rank passed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from .parallel_workers import EPCase, expert_parallel_worker, make_case, shard

CASES = (EPCase(seed=0, n_tokens=13), EPCase(seed=1, n_tokens=9, dead_experts=(0, 1, 2)),
         EPCase(seed=2, n_tokens=11, favourite=5), EPCase(seed=3, n_tokens=1))
ATOL = 1e-5


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) if a.numel() else 0.0


def compare(rank: int, world_size: int, cases: Sequence[EPCase] = CASES) -> dict[str, float]:
    """The largest difference, per quantity, between this rank's expert-parallel results and
    the single-process layer (the router gradient is all-reduced over ranks first)."""
    diffs = {"y": 0.0, "y_fn": 0.0, "x_grad": 0.0, "gate_grad": 0.0, "expert_grads": 0.0}
    for case, got in zip(cases, expert_parallel_worker(rank, world_size, list(cases)),
                         strict=True):
        data = make_case(case)
        x = data.x.clone().requires_grad_(True)  # (T, D)
        ref = data.layer(x)
        (ref.y * data.target).sum().backward()
        want_y = shard(ref.y.detach(), rank, world_size)  # (T_r, D)
        diffs["y"] = max(diffs["y"], _max_diff(got["y"].detach(), want_y))
        diffs["y_fn"] = max(diffs["y_fn"], _max_diff(got["y_fn"], want_y))
        diffs["x_grad"] = max(diffs["x_grad"],
                              _max_diff(got["x_grad"], shard(x.grad, rank, world_size)))
        gate_grad = got["gate_grad"].clone()  # (E, D), this rank's part
        if world_size > 1:
            dist.all_reduce(gate_grad)
        diffs["gate_grad"] = max(diffs["gate_grad"],
                                 _max_diff(gate_grad, data.layer.gate.weight.grad))
        params = dict(data.layer.named_parameters())
        for name, grad in got["expert_grads"].items():
            want = params[name].grad
            want = torch.zeros_like(grad) if want is None else want
            diffs["expert_grads"] = max(diffs["expert_grads"], _max_diff(grad, want))
    return diffs


def main(argv: Sequence[str] | None = None) -> int:
    """Join torchrun's process group, compare with one process, write OUT/rank-<RANK>.json."""
    parser = argparse.ArgumentParser(prog="python -m moe_course.parallel_torchrun",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for rank-<RANK>.json")
    parser.add_argument("--backend", default="gloo", help="gloo (CPU, default) or nccl")
    args = parser.parse_args(argv)
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if v not in os.environ]
    if missing:
        print(f"moe_course.parallel_torchrun: {', '.join(missing)} not set: start it with "
              "torchrun (see --help)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dist.init_process_group(args.backend, init_method="env://")
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        diffs = compare(rank, world_size)
        passed = all(d <= ATOL for d in diffs.values())
        flags = torch.tensor([int(passed)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # every rank learns whether all passed
        result = {"rank": rank, "world_size": world_size,
                  "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
                  "node_rank": int(os.environ.get("GROUP_RANK", 0)),
                  "host": socket.gethostname(), "pid": os.getpid(), "atol": ATOL,
                  "max_abs_diff": diffs, "passed": passed, "all_passed": bool(flags.item()),
                  "cases": len(CASES)}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank-{rank}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"rank {rank}/{world_size} (node {result['node_rank']}): "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
              + (" ok" if passed else " MISMATCH"), flush=True)
        return 0 if flags.item() else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
