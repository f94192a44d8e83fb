"""One training step of a ~1.5B-parameter MM1.5 model on one GPU: FSDP2, bf16, with and without
activation checkpointing. Prints tokens/s, model FLOPs utilisation (MFU) against the device's bf16
dense peak, peak memory, and the largest number of 672-px crops (frames) per sample that fits.

Model (random init from configs, nothing downloaded): CLIP ViT-L/14 tower (24 layers, width 1024,
run at 672 px: 48 x 48 patches, position embeddings interpolated), C-Abstractor (144 tokens, width
1024, depth 3), Qwen2-1.5B-shaped LLM (28 layers, width 1536, GQA 12/2 heads, vocab 151936). Full
fine-tuning (every part trainable), AdamW. FSDP2 exactly as training uses it
(`mm15.base.training.sharding.shard_model`, bf16 parameters for compute, fp32 gradient reduction),
built as training builds it: on the `meta` device, sharded, then filled from one full CPU build
(`init_sharded_from_rank0`, the module's `init_on_meta`).

Options: `--packing` also measures a length mix (samples of 1 to `--frames` crops and 1/4 to 1x
`--text` tokens) as padded rows and as packed rows (`mm15.base.data.packing.pack_collate`; the LLM
with `flash_attention_2` when flash-attn is importable, else `sdpa`), tokens/s counting real
tokens only. `--compile`: every block compiled (`MM15Module(compile=True)`). `--fused-loss`: the
loss through liger-kernel's fused linear cross-entropy (`llm.fused_loss`).

Model FLOPs: the matmuls counted by `torch.utils.flop_counter.FlopCounterMode` on a step without
activation checkpointing (recomputation is not counted, the usual MFU convention), plus the
attention products per sample, by formula (`attention_flops`: the counter sees neither flash-attn's
kernels nor CPU SDPA). The padded length mix is charged the packed rows' FLOPs (the same samples'
useful work), so its MFU is lower by the padding it computes. Target: MFU >= 45 %.

    python benchmarks/gpu_train_step.py                          # CUDA machine
    python benchmarks/gpu_train_step.py --frames 10 --batch 2 --text 512 --out results.json
    python benchmarks/gpu_train_step.py --packing --compile --fused-loss
    python benchmarks/gpu_train_step.py --smoke [--packing]      # tiny model, runs on CPU (gloo)
"""

from __future__ import annotations

import argparse
import importlib.util
import gc
import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from mm15.base.attention import segments
from mm15.base.connector import ConnectorSpec
from mm15.base.data.packing import PackSpec, pack_collate
from mm15.base.data.sample import IGNORE_INDEX
from mm15.base.model import LLMSpec, MM15Model, ModelSpec, VisionSpec, load_tokenizer
from mm15.base.training.sharding import compile_blocks, enable_activation_checkpointing, init_sharded_from_rank0

VIT_L = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
             num_attention_heads=16, image_size=336, patch_size=14)
QWEN2_1_5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                  num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True, rope_theta=1e6)
TINY_VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, image_size=32, patch_size=8)
TINY_LLM = dict(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
# bf16 dense tensor-core peaks (no sparsity), TFLOP/s.
PEAKS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100": 989.4,
         "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=10, help="672-px crops per sample (MM1.5 SFT: 5-10)")
    p.add_argument("--batch", type=int, default=2, help="samples per step")
    p.add_argument("--text", type=int, default=512, help="text tokens per sample besides the media tokens")
    p.add_argument("--crop", type=int, default=672)
    p.add_argument("--steps", type=int, default=8, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=None, help="override the device's bf16 peak")
    p.add_argument("--max_frames", type=int, default=256, help="upper end of the largest-frame-count search (0: skip)")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 steps, no search: checks the script on CPU")
    p.add_argument("--packing", action="store_true", help="also measure a length mix, padded and packed")
    p.add_argument("--compile", action="store_true", help="torch.compile every tower and LLM block")
    p.add_argument("--fused-loss", dest="fused_loss", action="store_true",
                   help="liger-kernel fused linear cross-entropy (CUDA + `pip install liger-kernel`)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def device_peak(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAKS.items():  # most specific names first
        if key in name:
            return tflops * 1e12
    return None


def init_process_group(device: torch.device) -> bool:
    """A 1-process group for FSDP2 (torchrun's environment is used when present)."""
    if dist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def attention_implementation(device: torch.device) -> str:
    """`flash_attention_2` where flash-attn can run (CUDA, importable): packed rows then attend
    through its variable-length kernel; else `sdpa`."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


_FULL: dict[tuple, MM15Model] = {}  # rank 0's full CPU build, the source of every rebuild's weights


def build(args: argparse.Namespace, device: torch.device, checkpointing: bool) -> tuple[MM15Model, Any]:
    vision, llm = (TINY_VISION, TINY_LLM) if args.smoke else (VIT_L, QWEN2_1_5B)
    connector = ConnectorSpec(num_tokens=4, hidden_size=32, depth=1) if args.smoke else ConnectorSpec()
    llm_spec = LLMSpec(config=llm, attn_implementation=attention_implementation(device), fused_loss=args.fused_loss)
    spec = ModelSpec(VisionSpec(config=vision), llm_spec, connector, tokenizer="tiny")

    def make(on_meta: bool) -> MM15Model:
        if not on_meta:  # the same weights for every configuration: built once
            key = (args.smoke, args.crop, args.fused_loss)
            if key not in _FULL:
                torch.manual_seed(0)
                with torch.device("cpu"):
                    _FULL[key] = MM15Model.build(spec, load_tokenizer(spec), crop_size=args.crop).requires_grad_(True)
            return _FULL[key]
        model = MM15Model.build(spec, load_tokenizer(spec), crop_size=args.crop)
        model.requires_grad_(True)
        if checkpointing:
            enable_activation_checkpointing(model)
        return model

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model, _ = init_sharded_from_rank0(make, mesh, device, precision="bf16-mixed")
    if args.compile:
        compile_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    return model, optimizer


def make_batch(model: MM15Model, args: argparse.Namespace, frames: int, device: torch.device) -> dict[str, Any]:
    """`batch` samples of `frames` crops (tokens_per_crop placeholders each) between two halves of text."""
    media = frames * model.tokens_per_crop
    half = args.text // 2
    text = [k % 250 + 1 for k in range(args.text)]  # byte tokens, never the placeholder
    row = text[:half] + [model.image_token_id] * media + text[half:]
    ids = torch.tensor([row] * args.batch, device=device)
    labels = ids.clone()
    labels[:, : half + media] = IGNORE_INDEX  # loss on the answer half
    pixels = torch.randn(args.batch * frames, 3, args.crop, args.crop, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels}


def mixed_items(model: MM15Model, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """2 x `batch` samples of a length mix: crops cycling over `frames`, 1, `frames` / 2, 2 and
    text over 1, 1/4, 1/2, 3/4 of `text` (loss on the second half of the text)."""
    items = []
    for i in range(2 * args.batch):
        frames = max(1, [args.frames, 1, args.frames // 2, 2][i % 4])
        n_text = max(2, args.text * [4, 1, 2, 3][(i + 1) % 4] // 4)
        half = n_text // 2
        text = [(k + 7 * i) % 250 + 1 for k in range(n_text)]
        ids = torch.tensor(text[:half] + [model.image_token_id] * (frames * model.tokens_per_crop) + text[half:])
        labels = ids.clone()
        labels[: len(ids) - (n_text - half)] = IGNORE_INDEX
        items.append({"input_ids": ids, "labels": labels, "layouts": [], "id": str(i), "task": "mix", "answer": "",
                      "meta": {}, "pixel_values": torch.randn(frames, 3, args.crop, args.crop, device=device)})
    return items


def mixed_batch(items: list[dict[str, Any]], packed: bool, device: torch.device) -> dict[str, Any]:
    """The length mix as packed rows (each as long as the longest sample) or as padded rows."""
    if packed:
        batch = pack_collate(items, PackSpec(max_tokens=max(len(x["input_ids"]) for x in items)), pad_token_id=0)
        keys = ("input_ids", "labels", "attention_mask", "position_ids", "sample_index")
        return {**{k: batch[k].to(device) for k in keys}, "pixel_values": batch["pixel_values"]}
    width = max(len(x["input_ids"]) for x in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for r, x in enumerate(items):
        n = len(x["input_ids"])
        ids[r, :n], labels[r, :n], mask[r, :n] = x["input_ids"], x["labels"], 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device),
            "pixel_values": torch.cat([x["pixel_values"] for x in items])}


def train_step(model: MM15Model, optimizer: Any, batch: dict[str, Any]) -> float:
    features = model.encode_media(batch["pixel_values"])  # (C, M, D), as MM15Module.media_features
    out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], media_features=features,
                position_ids=batch.get("position_ids"), sample_index=batch.get("sample_index"))
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_lengths(batch: dict[str, Any]) -> list[int]:
    """Real tokens of every sample: packed rows split where position ids restart (the split
    `packed_sdpa` attends over), padded rows by their attention mask."""
    mask = batch["attention_mask"].cpu()
    spans = segments(batch["position_ids"].cpu()) if batch.get("position_ids") is not None else None
    if spans is None:
        return [int(n) for n in mask.sum(dim=1)]
    return [int(mask[r, b:e].sum()) for r, row in enumerate(spans) for b, e in row if mask[r, b:e].any()]


def attention_flops(model: MM15Model, batch: dict[str, Any]) -> float:
    """FLOPs of every attention product of a forward and backward pass, per sample (packed samples
    never attend to each other): Q K^T and the weighted sum of V cost 2 L^2 D each forward, twice
    that backward, so 12 L^2 D per layer, D = heads x head dim; full squares (causal masking not
    halved, as FlopCounterMode's SDPA formulas count). LLM over each sample's tokens; every tower
    layer over each crop's patches (plus a class token where the tower has one)."""
    llm = model.llm.config.get_text_config()
    head_dim = getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads
    total = 12 * sum(n * n for n in sample_lengths(batch)) * llm.num_attention_heads * head_dim * llm.num_hidden_layers
    vision = model.vision.config
    patches = (batch["pixel_values"].shape[-1] // vision.patch_size) ** 2
    tokens = patches + int(hasattr(getattr(model.vision, "vision_model", model.vision).embeddings, "class_embedding"))
    crops = batch["pixel_values"].shape[0]
    return total + 12 * crops * tokens * tokens * vision.hidden_size * vision.num_hidden_layers


def count_flops(model: MM15Model, optimizer: Any, batch: dict[str, Any]) -> float:
    """Model FLOPs of one step: FlopCounterMode for every matmul, plus `attention_flops`. The
    attention kernels' own counts are replaced because the counter sees only some of them: CUDA's
    SDPA kernels, but neither flash-attn's varlen kernels nor CPU SDPA; and over a packed row it
    would count the whole row's square, not each sample's."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(model, optimizer, batch)
    counted = counter.get_flop_counts().get("Global", {})
    kernels = sum(flops for op, flops in counted.items() if "attention" in str(op) or "flash_attn" in str(op))
    return float(counter.get_total_flops()) - kernels + attention_flops(model, batch)


def measure(args: argparse.Namespace, device: torch.device, checkpointing: bool, flops: float | None,
            layout: str = "uniform") -> dict[str, Any]:
    """One configuration; `layout`: `uniform` (every sample `frames` crops and `text` tokens), or the
    length mix `padded` / `packed`."""
    model, optimizer = build(args, device, checkpointing)
    if layout == "uniform":
        batch = make_batch(model, args, args.frames, device)
    else:
        batch = mixed_batch(mixed_items(model, args, device), layout == "packed", device)
    if flops is None:
        flops = count_flops(model, optimizer, batch)
    for _ in range(args.warmup):
        train_step(model, optimizer, batch)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(model, optimizer, batch)
    sync(device)
    step_s = (time.perf_counter() - start) / args.steps
    tokens = int(batch["attention_mask"].sum())  # real tokens: padding is not throughput
    peak = device_peak(args, device)
    result = {"layout": layout, "rows": int(batch["input_ids"].shape[0]), "row_tokens": int(batch["input_ids"].shape[1]),
              "compile": args.compile, "fused_loss": args.fused_loss,
              "activation_checkpointing": checkpointing, "step_s": step_s, "tokens_per_s": tokens / step_s,
              "tokens_per_step": tokens, "model_tflops_per_step": flops / 1e12, "achieved_tflops": flops / step_s / 1e12,
              "mfu": flops / step_s / peak if peak else None, "loss": loss,
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    del model, optimizer, batch
    free(device)
    if args.max_frames and device.type == "cuda" and layout == "uniform":
        result["max_frames_batch1"] = largest_frames(args, device, checkpointing)
    return result


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fits(args: argparse.Namespace, device: torch.device, model: MM15Model, optimizer: Any, frames: int) -> bool:
    one = argparse.Namespace(**{**vars(args), "batch": 1})
    try:
        train_step(model, optimizer, make_batch(model, one, frames, device))
        sync(device)
        return True
    except torch.OutOfMemoryError:
        return False


def largest_frames(args: argparse.Namespace, device: torch.device, checkpointing: bool) -> int:
    """Doubling from 8, then bisection, over crops per sample at batch 1. The model is rebuilt after
    an OOM (one in the middle of a sharded backward leaves FSDP state behind)."""
    model, optimizer = build(args, device, checkpointing)
    good, bad, frames = 0, None, 8
    while bad is None or bad - good > 1:
        if fits(args, device, model, optimizer, frames):
            good = frames
        else:
            bad = frames
            del model, optimizer
            free(device)
            model, optimizer = build(args, device, checkpointing)
        if bad is None and good * 2 > args.max_frames:
            break  # fits up to the search limit
        frames = good * 2 if bad is None else (good + bad) // 2
    del model, optimizer
    free(device)
    return good


def report(results: list[dict[str, Any]], args: argparse.Namespace, device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test: no meaningful figures)"
    print(f"\n{name}: batch {args.batch} x ({args.frames} crops x {args.crop} px + {args.text} text tokens), FSDP2 bf16, "
          f"meta-device init, attention {attention_implementation(device)}, compile {args.compile}, "
          f"fused loss {args.fused_loss}")
    print(f"{'layout':>8} {'rows x len':>11} {'act. ckpt':>9} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'peak GiB':>9} {'max frames':>10}")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        shape = f"{r['rows']} x {r['row_tokens']}"
        print(f"{r['layout']:>8} {shape:>11} {str(r['activation_checkpointing']):>9} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} "
              f"{r['achieved_tflops']:8.1f} {mfu:>6} {mem:>9} {r.get('max_frames_batch1', '-'):>10}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.smoke:
        args.crop, args.frames, args.batch, args.text, args.steps, args.warmup, args.max_frames = 32, 2, 2, 16, 2, 1, 0
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_train_step.py measures a CUDA GPU and none is visible here; "
                         "run it on a GPU machine, or pass --smoke to check the script on CPU")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    created = init_process_group(device)
    try:
        results = []
        for layout in ("uniform", *(("packed", "padded") if args.packing else ())):
            flops = None if layout != "padded" else flops  # padded rows: the packed samples' useful FLOPs
            for checkpointing in (False, True):
                results.append(measure(args, device, checkpointing, flops, layout))
                flops = results[-1]["model_tflops_per_step"] * 1e12  # model FLOPs exclude recomputation
        report(results, args, device)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": str(device), "args": vars(args), "results": results}, f, indent=2)
        return results
    finally:
        if created:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
