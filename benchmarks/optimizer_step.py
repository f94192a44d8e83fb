"""Optimizer-step time: `mm15.base.training.optim.MuonAdamW` against `torch.optim.AdamW` (the baseline, same run).

Both step the same MM15Module parameter groups (Muon takes the `nn.Linear` weights, AdamW the rest) with
the same random gradients; only `optimizer.step()` is timed (median of `--iters` after `--warmup`). The
model is the UI demo's (`configs/ui/demo.yaml`: hidden 64, 2 + 2 layers) or, with `--hidden/--layers`,
a wider Llama and CLIP tower of the same shape family. Muon's extra cost is the Newton-Schulz iteration:
5 x 3 matrix products per hidden matrix, so it grows as hidden^3 per matrix while AdamW grows as hidden^2;
the forward + backward grows as tokens x hidden^2, so Muon's share of a step is about hidden / tokens per
step: small for GPU-sized batches, large for a wide model on a CPU-sized batch. For that context the
script also times the LLM's forward + backward on `--batch` x `--length` tokens.

    python benchmarks/optimizer_step.py                          # the UI demo's model
    python benchmarks/optimizer_step.py --hidden 512 --layers 4  # wider
    python benchmarks/optimizer_step.py --device cuda --hidden 2048 --layers 16 --ns_dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml

from mm15.base.model import ModelSpec
from mm15.base.module import MM15Module
from mm15.base.training.optim import MuonAdamW
from mm15.base.data.processor import PreprocessSpec
from mm15.base.specs import from_dict

DEMO = Path(__file__).resolve().parents[1] / "configs" / "ui" / "demo.yaml"


def build(args: argparse.Namespace) -> MM15Module:
    init = yaml.safe_load(DEMO.read_text())["model"]["init_args"]
    model = init["model"]
    if args.hidden:
        model["llm"]["config"].update(hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                      num_attention_heads=args.hidden // 16, num_key_value_heads=args.hidden // 32)
        model["vision"]["config"].update(hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                         num_attention_heads=args.hidden // 16)
        model["connector"]["hidden_size"] = args.hidden
    if args.layers:
        model["llm"]["config"]["num_hidden_layers"] = args.layers
        model["vision"]["config"]["num_hidden_layers"] = args.layers
    module = MM15Module(model=from_dict(ModelSpec, model), preprocessing=from_dict(PreprocessSpec, init["preprocessing"]))
    module.configure_model()
    return module.to(args.device)


def time_steps(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], args: argparse.Namespace) -> float:
    g = torch.Generator(device=args.device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=args.device) * 1e-3
    times = []
    for k in range(args.warmup + args.iters):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if k >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_llm_pass(module: MM15Module, args: argparse.Namespace) -> float:
    """Median time of the LLM's forward + backward on `--batch` x `--length` random tokens: the context that
    says what the optimizer's extra milliseconds cost per training step."""
    llm = module.model.llm
    ids = torch.randint(0, llm.config.vocab_size, (args.batch, args.length), device=args.device)
    times = []
    for k in range(2 + max(3, args.iters // 10)):
        start = time.perf_counter()
        llm(input_ids=ids, labels=ids).loss.backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if k >= 2:
            times.append(time.perf_counter() - start)
    llm.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=0, help="0: the demo's 64")
    p.add_argument("--layers", type=int, default=0, help="0: the demo's 2 (LLM and tower)")
    p.add_argument("--ns_dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32, help="LLM pass for context: sequences (the demo: 32)")
    p.add_argument("--length", type=int, default=145, help="LLM pass for context: tokens each (the demo: ~145)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    module = build(args)
    groups = module.parameter_groups()
    params = [q for g in groups for q in g["params"]]
    muon_share = sum(q.numel() for g in groups if g["muon"] for q in g["params"]) / sum(q.numel() for q in params)
    adamw = time_steps(torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0), params, args)
    module = build(args)  # fresh weights and state for the second optimizer
    groups = module.parameter_groups()
    params = [q for g in groups for q in g["params"]]
    muon = time_steps(MuonAdamW(groups, lr=1e-3, ns_dtype=args.ns_dtype), params, args)
    print(f"{sum(q.numel() for q in params) / 1e6:.2f} M trainable parameters, {muon_share:.0%} in Muon's groups, "
          f"{args.device}, {args.threads} thread(s)")
    print(f"torch.optim.AdamW (baseline) {adamw * 1e3:8.2f} ms per step")
    print(f"MuonAdamW ({args.ns_dtype} Newton-Schulz) {muon * 1e3:8.2f} ms per step")
    print(f"ratio MuonAdamW / AdamW: {muon / adamw:.2f}")
    llm_pass = time_llm_pass(module, args)
    print(f"LLM forward + backward, {args.batch} x {args.length} tokens: {llm_pass * 1e3:.1f} ms; Muon's extra "
          f"{(muon - adamw) * 1e3:.1f} ms is {(muon - adamw) / llm_pass:.0%} of it")


if __name__ == "__main__":
    main()
