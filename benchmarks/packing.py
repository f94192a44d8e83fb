"""Training tokens per second: packed rows against padded batches, and transformers' LLaVA (padded),
on the same samples, with length mixes of three kinds of data.

    python benchmarks/packing.py                       # CPU-sized model, 48 samples per mix
    python benchmarks/packing.py --device cuda --hidden 1024 --layers 8 --image 224 --patch 14

Mixes (crops per sample from the configs' splitting rules, text lengths as described):

* `ui`: `configs/ui/demo.yaml` - portrait or landscape 64x128 screens split by `plan_split`
  (crop 64, grids 2..4: 2 crops + the overview), the demo's prompt (system line, index
  indicators, question: 80 text tokens) and answers of 2 (a word) to 19 tokens (a box);
* `llava`: a LLaVA-style SFT set under `configs/base/sft_clip_qwen.yaml`'s splitting (grids 4..9
  + the overview: 5 to 10 crops) of photo, portrait-document and wide-chart shapes, with 1 to 6
  turns whose lengths are log-normal (median 60 tokens per turn, a long tail);
* `video`: `configs/video/sft.yaml` - 24 frames of one crop each, a question of 10 to 60 tokens and
  an answer that is short (QA, 60%) or log-normal (instruction data, median 80 tokens).

Each mix (and `all`, the three shuffled together, the long-tailed case of a screenshot sharing a
batch with a 24-frame video) is cut into micro-batches of `--batch` samples, and each method trains
on the same micro-batches (forward, backward, AdamW step):

* `padded` (the baseline): mm15, each micro-batch right-padded to its longest sample;
* `packed`: mm15, the same samples packed into rows of `--pack-tokens` (`pack_collate`), attention
  per sample (`llm.attn_implementation: packed_sdpa`);
* `packed-mask`: the same rows through transformers' SDPA with its block-diagonal mask over each
  whole row (what `sdpa` does with packed rows: the cost grows with the square of the row length);
* `budget`: mm15, padded micro-batches chosen by length under a token budget (`budget_batches`,
  budget = `--batch` x the mix's mean length), so steps hold varying sample counts;
* `llava`: `LlavaForConditionalGeneration` with the same tower, Llama and the padded batches.

Both models use an MLP projector (patch tokens per crop), so every method sees equal work. Printed
per mix: the padding fraction, real tokens/s (every non-padding token) and target tokens/s, and the
ratio to `padded` measured in the same run. The last line is the ratio for `all`.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import build_llava  # noqa: E402  (the same LLaVA baseline as the step benchmark)

from mm15.base.connector import ConnectorSpec  # noqa: E402
from mm15.base.data.packing import PackSpec, TokenBudget, budget_batches, pack_collate  # noqa: E402
from mm15.base.data.processor import MM15Processor, PreprocessSpec  # noqa: E402
from mm15.base.data.sample import IGNORE_INDEX  # noqa: E402
from mm15.base.data.splitting import SplitSpec, plan_split  # noqa: E402
from mm15.base.model import LLMSpec, MM15Model, ModelSpec, VisionSpec, load_tokenizer  # noqa: E402


def crops(size: tuple[int, int], split: SplitSpec) -> int:
    return plan_split(*size, split).num_crops


def ui_mix(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    split = SplitSpec(crop_size=64, mode="dynamic", grid_min=2, grid_max=4)
    out = []
    for _ in range(n):
        size = (64, 128) if rng.random() < 0.5 else (128, 64)
        target = int(rng.choice([2, 19]))  # a widget word, or a box "[x1, y1, x2, y2]"
        out.append((crops(size, split), 80 + target, target))
    return out


def llava_mix(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    split = SplitSpec(crop_size=672, mode="dynamic", grid_min=4, grid_max=9, overview="last")
    shapes = [(640, 480), (480, 640), (1024, 768), (800, 1200), (1600, 600), (500, 375)]
    out = []
    for _ in range(n):
        size = shapes[int(rng.integers(len(shapes)))]
        turns = int(rng.integers(1, 7))
        questions = rng.lognormal(math.log(25), 0.6, turns).astype(int) + 5
        answers = rng.lognormal(math.log(60), 0.9, turns).astype(int) + 2
        out.append((crops(size, split), int(questions.sum() + answers.sum()) + 20, int(answers.sum())))
    return out


def video_mix(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    out = []
    for _ in range(n):
        question = int(rng.integers(10, 61))
        answer = int(rng.integers(2, 8)) if rng.random() < 0.6 else int(rng.lognormal(math.log(80), 0.7)) + 5
        out.append((24, question + answer + 20, answer))
    return out


def make_items(shape: list[tuple[int, int, int]], per_crop: int, image_id: int, r: int, vocab: int,
               g: torch.Generator) -> list[dict]:
    """Processed-sample dicts (as `MM15Processor` makes them) of the given (crops, text, targets)."""
    items = []
    for k, (n_crops, text, target) in enumerate(shape):
        prompt = text - target
        ids = torch.randint(300, vocab, (text,), generator=g)
        head = min(8, prompt)
        ids = torch.cat([ids[:head], torch.full((n_crops * per_crop,), image_id), ids[head:]])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-target:] = ids[-target:]
        items.append({"input_ids": ids, "labels": labels,
                      "pixel_values": torch.randint(0, 256, (n_crops, 3, r, r), generator=g, dtype=torch.uint8),
                      "id": str(k), "task": "bench", "answer": "", "meta": {}, "layouts": []})
    return items


def run(model, batches: list[dict], mode: str, args) -> tuple[float, int, int]:
    """Seconds for one pass over `batches` (after one warm-up step), real tokens, target tokens."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(b):
        pixels = b["pixel_values"].to(args.device).float().div_(255)
        ids, mask, labels = (b[k].to(args.device) for k in ("input_ids", "attention_mask", "labels"))
        if mode == "llava":
            loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        else:
            extra = {k: b[k].to(args.device) for k in ("position_ids", "sample_index") if k in b}
            loss = model(ids, mask, pixel_values=pixels, labels=labels, **extra).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for b in batches:
        step(b)
    sync()
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    return time.perf_counter() - t, real, targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=48, help="samples per mix")
    p.add_argument("--batch", type=int, default=8, help="samples per padded micro-batch")
    p.add_argument("--pack-tokens", type=int, default=2048, help="tokens per packed row")
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--mixes", default="ui,llava,video,all")
    p.add_argument("--no-llava", action="store_true", help="skip the transformers LLaVA row")
    args = p.parse_args()
    torch.manual_seed(0)
    vision = dict(model_type="clip_vision_model", hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                  num_hidden_layers=args.vision_layers, num_attention_heads=max(1, args.vision_hidden // 64),
                  image_size=args.image, patch_size=args.patch)
    llm = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(2.75 * args.hidden),
               num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
               num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=8192)
    spec = ModelSpec(VisionSpec(config=vision, feature_layer=-2), LLMSpec(config=llm), ConnectorSpec(kind="mlp"), tokenizer="tiny")
    tokenizer = load_tokenizer(spec)
    ours = MM15Model.build(spec, tokenizer, crop_size=args.image).to(args.device).train()
    masked = copy.deepcopy(ours)
    masked.llm.set_attn_implementation("sdpa")
    ours.llm.set_attn_implementation("packed_sdpa")  # SDPA itself on padded rows (no position restarts)
    llava = None if args.no_llava else build_llava(vision, llm, ours.image_token_id).to(args.device).train()
    processor = MM15Processor(tokenizer, PreprocessSpec(split=SplitSpec(crop_size=args.image)), ours.tokens_per_crop)
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
    shapes = {"ui": ui_mix(rng, args.samples), "llava": llava_mix(rng, args.samples), "video": video_mix(rng, args.samples)}
    shapes["all"] = [s for name in ("ui", "llava", "video") for s in shapes[name]]
    order = rng.permutation(len(shapes["all"]))
    shapes["all"] = [shapes["all"][i] for i in order]
    pack = PackSpec(max_tokens=args.pack_tokens)
    pad = processor.tokenizer.pad_token_id
    print(f"device={args.device} model: tower {args.vision_hidden}x{args.vision_layers}, Llama {args.hidden}x{args.layers}, "
          f"{ours.tokens_per_crop} tokens per crop; micro-batch {args.batch} samples, packed rows of {args.pack_tokens} tokens")
    print(f"{'mix':6s} {'method':11s} {'pad frac':>8s} {'tokens/s':>9s} {'target/s':>9s} {'ratio':>6s}  lengths p50/p90/max")
    ratio = None
    for name in args.mixes.split(","):
        items = make_items(shapes[name], ours.tokens_per_crop, ours.image_token_id, args.image, args.vocab, g)
        lengths = [len(x["input_ids"]) for x in items]
        groups = [items[s:s + args.batch] for s in range(0, len(items), args.batch)]
        budget = TokenBudget(max_tokens=int(args.batch * np.mean(lengths)), buffer=len(items))
        grouped = [[items[i] for i in b] for b in budget_batches(lengths, list(range(len(items))), budget)]
        methods = {"padded": (ours, [processor.collate(b) for b in groups]),
                   "packed": (ours, [pack_collate(b, pack, pad) for b in groups]),
                   "packed-mask": (masked, None),
                   "budget": (ours, [processor.collate(b) for b in grouped])}
        methods["packed-mask"] = (masked, methods["packed"][1])
        if llava is not None:
            methods["llava"] = (llava, methods["padded"][1])
        rates = {}
        for method, (model, batches) in methods.items():
            seconds, real, targets = run(model, batches, "llava" if method == "llava" else "mm15", args)
            padded_tokens = sum(b["input_ids"].numel() for b in batches)
            rates[method] = real / seconds
            print(f"{name:6s} {method:11s} {1 - real / padded_tokens:8.3f} {real / seconds:9.0f} {targets / seconds:9.0f} "
                  f"{rates[method] / rates['padded']:6.2f}  {int(np.median(lengths))}/{int(np.percentile(lengths, 90))}/{max(lengths)}")
        ratio = rates["packed"] / rates["padded"]
    print(f"packed/padded tokens/s ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
