"""Forward + backward time of the fast MoE layers against their loop oracle and the dense bound.

For each shape `(T, D, H, E, K)` and expert kind it times, interleaved in one process (round
robin over the layers, `--repeats` rounds, medians):

- `TopKMoE` as constructed by default (`dispatch="auto"`), and forced to each of its three
  layouts, `dispatch="blocked"`, `"grouped"` and `"padded"` (`moe_course.layers`);
- its loop-over-experts oracle `TopKMoE.loop_forward` (same weights);
- `DenseFFN` of the same expert kind with hidden width `K*H`: the same active FLOPs, so the
  practical lower bound ("dense bound");
- with `transformers` importable (optional extra `bench`), Hugging Face's
  `MixtralSparseMoeBlock` with its `eager` experts (a loop over the experts hit) and its
  `grouped_mm` experts (`torch.nn.functional.grouped_mm` on rows sorted by expert), against
  the SwiGLU layers, with our weights copied in and its output checked against ours.

Each timed call is `layer(x)` then `y.backward(grad)` for a fixed `grad`, with `x` requiring
grad, so the router, the experts and the input all get gradients. The router is a fresh
`nn.Linear` (random init) on standard-normal tokens: the mildly unbalanced routing of the
start of training. Ratios are to the dense bound of the same expert kind in the same run:
`/ dense` divides the medians, `paired / dense` is the median over rounds of each round's
ratio (the layer and the dense layer timed back to back, so a slow spell of the machine
that lasts a round cancels).

    python benchmarks/bench_layers.py                 # all shapes, both expert kinds
    python benchmarks/bench_layers.py --repeats 5 --shapes 512,64,128,8,2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe_course.layers import DenseFFN, TopKMoE

SHAPES = ((512, 64, 128, 8, 2), (4096, 256, 512, 8, 2), (4096, 256, 256, 32, 4))


@dataclass(frozen=True)
class Shape:
    """One benchmark point, in the course's shape legend."""

    t: int  # tokens
    d: int  # model width
    h: int  # expert hidden width
    e: int  # experts
    k: int  # experts per token


def parse_shape(text: str) -> Shape:
    values = [int(v) for v in text.split(",")]
    if len(values) != 5:
        raise argparse.ArgumentTypeError(f"a shape is T,D,H,E,K; got {text!r}")
    return Shape(*values)


def hf_mixtral_blocks(layer: TopKMoE) -> dict[str, nn.Module]:
    """Hugging Face Mixtral blocks with `layer`'s weights, one per experts implementation.

    `transformers` selects the experts' forward from `config._experts_implementation`
    (`integrations/moe.py`, decorator `use_experts_implementation`): `"eager"` is the loop
    over the experts hit, `"grouped_mm"` sorts rows by expert and calls
    `torch.nn.functional.grouped_mm`; a full model loaded by `from_pretrained` defaults to
    `"grouped_mm"` when it can dispatch it. Empty when `transformers` is not importable.
    """
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return {}
    bank = layer.experts
    blocks: dict[str, nn.Module] = {}
    if not hasattr(MixtralSparseMoeBlock(MixtralConfig(hidden_size=8, intermediate_size=8,
                                                       num_local_experts=2)).experts,
                   "gate_up_proj"):
        print("note: this transformers keeps Mixtral's experts as separate modules (before "
              "5.0); its blocks are left out")
        return blocks
    for impl in ("eager", "grouped_mm"):
        config = MixtralConfig(hidden_size=bank.d_model, intermediate_size=bank.d_hidden,
                               num_local_experts=bank.n_experts, num_experts_per_tok=layer.k,
                               router_jitter_noise=0.0, hidden_act="silu")
        config._experts_implementation = impl
        block = MixtralSparseMoeBlock(config)
        with torch.no_grad():
            block.gate.weight.copy_(layer.gate.weight)  # (E, D)
            gate_up = torch.cat([bank.w1, bank.w3], dim=2).transpose(1, 2)  # (E, 2H, D)
            block.experts.gate_up_proj.copy_(gate_up)
            block.experts.down_proj.copy_(bank.w2.transpose(1, 2))  # (E, D, H)
        blocks[f"HF Mixtral {impl}"] = block
    return blocks


Layer = tuple[Callable[[Tensor], Tensor], nn.Module]  # x (T, D) -> y (T, D), and its module


def candidates(shape: Shape, expert: str, seed: int,
               capacity_factor: float | None = None) -> dict[str, Layer]:
    """The layers to time at one shape: a function `x (T, D) -> y (T, D)` and its module."""
    torch.manual_seed(seed)
    fast = TopKMoE(shape.d, shape.h, shape.e, shape.k, capacity_factor, expert)  # "auto"
    forced = {}
    for dispatch in ("blocked", "grouped", "padded"):
        forced[dispatch] = TopKMoE(shape.d, shape.h, shape.e, shape.k, capacity_factor, expert,
                                   dispatch=dispatch)
        forced[dispatch].load_state_dict(fast.state_dict())
    dense = DenseFFN(shape.d, shape.k * shape.h, expert)
    layers: dict[str, Layer] = {
        "dense FFN (K*H)": (dense, dense),
        "TopKMoE (default)": (lambda x: fast(x).y, fast),
        "TopKMoE blocked": (lambda x: forced["blocked"](x).y, forced["blocked"]),
        "TopKMoE grouped": (lambda x: forced["grouped"](x).y, forced["grouped"]),
        "TopKMoE padded": (lambda x: forced["padded"](x).y, forced["padded"]),
        "loop oracle": (lambda x: fast.loop_forward(x).y, fast),
    }
    if expert == "swiglu" and capacity_factor is None:  # Mixtral is dropless
        for name, block in hf_mixtral_blocks(fast).items():
            layers[name] = (lambda x, block=block: _hf_output(block(x[None]))[0], block)
    return layers


def _hf_output(out: Tensor | tuple[Tensor, ...]) -> Tensor:
    return out[0] if isinstance(out, tuple) else out  # older versions also return logits


def check(layers: dict[str, Layer], x: Tensor) -> float:
    """Largest deviation of any MoE layer's output from the loop oracle's (same weights)."""
    with torch.no_grad():
        ref = layers["loop oracle"][0](x)
        return max(float((layers[n][0](x) - ref).abs().max()) for n in layers
                   if n not in ("loop oracle", "dense FFN (K*H)"))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_round_robin(layers: dict[str, Layer], x: Tensor, grad: Tensor, repeats: int,
                     warmup: int, clock: Callable[[], float]) -> dict[str, list[float]]:
    """Seconds per forward + backward of each layer, layers interleaved in every round.

    Gradients are reset to None before each call, so no layer pays for accumulating them.
    """
    times: dict[str, list[float]] = {name: [] for name in layers}
    for r in range(warmup + repeats):
        for name, (layer, module) in layers.items():
            x.grad = None
            module.zero_grad(set_to_none=True)
            start = clock()
            layer(x).backward(grad)
            elapsed = clock() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


def machine_note() -> str:
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"load average {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", type=parse_shape, nargs="+",
                        default=[Shape(*s) for s in SHAPES], help="T,D,H,E,K ...")
    parser.add_argument("--experts", nargs="+", default=["gelu", "swiglu"],
                        choices=["gelu", "swiglu"])
    parser.add_argument("--repeats", type=int, default=21, help="timed rounds per shape")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time, which other "
                        "processes on a shared machine barely disturb (use with --threads 1)")
    parser.add_argument("--skip", nargs="*", default=[], help="layer names to leave out")
    parser.add_argument("--capacity-factor", type=float, default=None,
                        help="token-choice capacity factor (default: dropless)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine_note()}; clock: {args.clock}; capacity factor: "
          f"{args.capacity_factor}")
    print("| T, D, H, E, K | expert | layer | median ms | IQR ms | / dense | paired / dense |")
    print("|---|---|---|---:|---:|---:|---:|")
    for shape in args.shapes:
        for expert in args.experts:
            layers = candidates(shape, expert, args.seed, args.capacity_factor)
            for name in args.skip:
                layers.pop(name, None)
            gen = torch.Generator().manual_seed(args.seed + 1)
            x = torch.randn(shape.t, shape.d, generator=gen).requires_grad_()
            grad = torch.randn(shape.t, shape.d, generator=gen)
            if "loop oracle" in layers:
                err = check(layers, x)
                if err > 1e-4:
                    raise RuntimeError(f"layers disagree with the oracle by {err:.2e}")
            times = time_round_robin(layers, x, grad, args.repeats, args.warmup,
                                     CLOCKS[args.clock])
            dense_times = times["dense FFN (K*H)"]
            dense = statistics.median(dense_times)
            label = f"{shape.t}, {shape.d}, {shape.h}, {shape.e}, {shape.k}"
            for name, values in times.items():
                med = statistics.median(values)
                q = statistics.quantiles(values, n=4) if len(values) > 1 else [med, med, med]
                paired = statistics.median(v / d for v, d in zip(values, dense_times, strict=True))
                print(f"| {label} | {expert} | {name} | {med * 1e3:.2f} | "
                      f"{(q[2] - q[0]) * 1e3:.2f} | {med / dense:.2f} | {paired:.2f} |",
                      flush=True)
    print(f"machine at the end: {machine_note()}")


if __name__ == "__main__":
    main()
