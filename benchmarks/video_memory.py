"""Peak memory of one video training step (forward, backward, AdamW step) at 8, 16, 24, 32 frames.

    python benchmarks/video_memory.py                       # small random model, CPU or the GPU
    python benchmarks/video_memory.py --frames 8 16 24 32 --llm-hidden 1024 --llm-layers 8

The batch is one real sample: a generated clip read through `VideoProcessor` (frames at `--size`
px, `tokens_per_crop` from the connector), so sequence lengths are the pipeline's own. On CUDA the
figure is `torch.cuda.max_memory_allocated` during the step; on CPU it is the growth of the
process's peak resident set during the step, each frame count in a fresh process (so one run's
peak cannot hide the next). The table also gives the sequence length and the step time.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mm15.base.connector import ConnectorSpec
from mm15.base.model import LLMSpec, ModelSpec, VisionSpec
from mm15.base.data.sample import Media, Sample, Turn
from mm15.base.data.splitting import SplitSpec
from mm15.data_builders.synthetic_video import make_clip, write_video
from mm15.video.module import MM15VideoModule
from mm15.video.processor import VideoPreprocessSpec, VideoSpec
from mm15.video.sampling import FrameSampling


def build_module(args: argparse.Namespace, frames: int) -> MM15VideoModule:
    vision = {"model_type": "clip_vision_model", "hidden_size": args.vision_hidden, "intermediate_size": 4 * args.vision_hidden,
              "num_hidden_layers": args.vision_layers, "num_attention_heads": 8, "image_size": args.size, "patch_size": 14}
    llm = {"model_type": "llama", "vocab_size": 262, "hidden_size": args.llm_hidden, "intermediate_size": 4 * args.llm_hidden,
           "num_hidden_layers": args.llm_layers, "num_attention_heads": 8, "num_key_value_heads": 8,
           "max_position_embeddings": 16384}
    spec = ModelSpec(vision=VisionSpec(config=vision), llm=LLMSpec(config=llm),
                     connector=ConnectorSpec(num_tokens=args.tokens, hidden_size=args.vision_hidden, depth=1), tokenizer="tiny")
    pre = VideoPreprocessSpec(split=SplitSpec(crop_size=args.size, mode="none"), max_length=16384,
                              video=VideoSpec(sampling=FrameSampling(frames)))
    module = MM15VideoModule(model=spec, preprocessing=pre)
    module.configure_model()
    return module


def one_step(args: argparse.Namespace, frames: int, clip: str) -> dict[str, float]:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = build_module(args, frames).to(device)
    sample = Sample("m", [Turn("user", "<image>\nWhat happens in the video?"), Turn("assistant", "A shape moves.")],
                    [Media(clip, kind="video")])
    batch = module.processor.collate([module.processor(sample)])
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    module(batch).loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024  # KiB -> MiB
    return {"frames": frames, "seq": int(batch["input_ids"].shape[1]), "media": int((batch["input_ids"] == module.processor.image_token_id).sum()),
            "peak_mib": peak, "step_s": time.perf_counter() - start, "device": device.type}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 24, 32])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--tokens", type=int, default=144, help="connector tokens per frame")
    parser.add_argument("--vision-hidden", type=int, default=256)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--llm-hidden", type=int, default=512)
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--clip", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:  # child process: one frame count, JSON on stdout
        print(json.dumps(one_step(args, args.one, args.clip)))
        return
    clip = args.clip or str(Path(tempfile.mkdtemp(prefix="mm15_video_mem_")) / "clip.mp4")
    if not Path(clip).exists():
        write_video(clip, make_clip(random.Random(0), "right", size=256, num_frames=65), fps=8)
    sizes = ["--size", args.size, "--tokens", args.tokens, "--vision-hidden", args.vision_hidden,
             "--vision-layers", args.vision_layers, "--llm-hidden", args.llm_hidden, "--llm-layers", args.llm_layers]
    print(f"one training step, vision {args.vision_layers}x{args.vision_hidden} at {args.size} px, "
          f"LLM {args.llm_layers}x{args.llm_hidden}, {args.tokens} tokens per frame")
    print(f"{'frames':>6} {'media tokens':>13} {'sequence':>9} {'peak MiB':>9} {'step s':>7}")
    for frames in args.frames:
        cmd = [sys.executable, __file__, "--one", str(frames), "--clip", clip, *map(str, sizes)]
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"{row['frames']:>6} {row['media']:>13} {row['seq']:>9} {row['peak_mib']:>9.0f} {row['step_s']:>7.2f}"
              f"   ({row['device']})", flush=True)


if __name__ == "__main__":
    main()
