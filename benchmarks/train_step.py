"""Training-step time: our MM15Model (MLP connector) vs transformers' LlavaForConditionalGeneration.

Both get the same CLIP tower config, the same Llama config, the same batch (B samples, each with one
image's patch tokens and a text answer) and AdamW; we time forward + backward + optimizer step.
Baseline: `LlavaForConditionalGeneration` measured in the same run. Target: ratio <= 1.0.

    python benchmarks/train_step.py                 # CPU-sized defaults
    python benchmarks/train_step.py --device cuda --hidden 2048 --layers 16 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mm15.base.connector import ConnectorSpec
from mm15.base.model import LLMSpec, MM15Model, ModelSpec, VisionSpec, load_tokenizer


def configs(args):
    vision = dict(model_type="clip_vision_model", hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                  num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_hidden // 64,
                  image_size=args.image, patch_size=14)
    llm = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(2.75 * args.hidden),
               num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
               max_position_embeddings=4096)
    return vision, llm


def build_ours(vision, llm, args):
    spec = ModelSpec(VisionSpec(config=vision, feature_layer=-2), LLMSpec(config=llm), ConnectorSpec(kind="mlp"), tokenizer="tiny")
    tok = load_tokenizer(spec)
    model = MM15Model.build(spec, tok, crop_size=args.image)
    return model, model.image_token_id


def build_llava(vision, llm, image_token_id):
    v = {k: x for k, x in vision.items() if k != "model_type"}
    t = {k: x for k, x in llm.items() if k != "model_type"}
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**v), text_config=LlamaConfig(**t), image_token_index=image_token_id,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(cfg)


def make_batch(args, image_token_id, n_image_tokens, device):
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 250, (args.batch, args.text_len), generator=g)
    ids = torch.cat([text[:, :8], torch.full((args.batch, n_image_tokens), image_token_id), text[:, 8:]], 1)
    labels = ids.clone()
    labels[:, : 8 + n_image_tokens + args.text_len // 2] = -100  # answer = second half of the text
    pixels = torch.randn(args.batch, 3, args.image, args.image, generator=g)
    return ids.to(device), torch.ones_like(ids).to(device), labels.to(device), pixels.to(device)


def time_steps(step, args) -> float:
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--vision-hidden", type=int, default=256)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--text-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    args = p.parse_args()
    torch.manual_seed(0)
    vision, llm = configs(args)
    ours, image_token_id = build_ours(vision, llm, args)
    llava = build_llava(vision, llm, image_token_id)
    n_img = ours.tokens_per_crop
    ids, mask, labels, pixels = make_batch(args, image_token_id, n_img, args.device)
    results = {}
    for name, model in (("llava (baseline)", llava), ("mm15", ours)):
        model.to(args.device).train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)

        def step(model=model, opt=opt):
            if model is ours:
                loss = model(ids, mask, pixel_values=pixels, labels=labels).loss
            else:
                loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        results[name] = time_steps(step, args)
        model.to("cpu")
    base, mine = results["llava (baseline)"], results["mm15"]
    print(f"device={args.device} batch={args.batch} seq={ids.shape[1]} (image tokens {n_img}) vocab={args.vocab}")
    print(f"llava (baseline) step: {base * 1000:.1f} ms")
    print(f"mm15 step:             {mine * 1000:.1f} ms")
    print(f"ratio mm15 / llava:    {mine / base:.3f}  (target <= 1.0)")


if __name__ == "__main__":
    main()
