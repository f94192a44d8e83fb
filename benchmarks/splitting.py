"""Dynamic-splitting throughput: our MM1.5 splitter vs transformers' LLaVA-OneVision image processor.

Both take the same decoded RGB images (varied sizes and aspect ratios) and produce normalised
float crops at 384 px (LLaVA-OneVision's crop size): ours with MM1.5 grids (4, 9) + overview,
theirs with its 36 any-res pinpoints + base image. The baseline is the processor transformers
picks on this machine (the PIL backend without torchvision, the torchvision backend with it),
measured in the same run. Target: ours no slower (ratio >= 1.0 in images/s).

    python benchmarks/splitting.py [--images 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from PIL import Image

from mm15.base.data.media import CLIP_MEAN, CLIP_STD
from mm15.base.data.splitting import SplitSpec, split_image

SIZES = [(1000, 700), (700, 1000), (1170, 2532), (2532, 1170), (640, 480), (1920, 1080), (300, 300), (4000, 1000)]


def make_images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        out.append(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return out


def ours(images: list[np.ndarray], spec: SplitSpec) -> int:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    n = 0
    for img in images:
        crops, _ = split_image(img, spec)
        x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
        n += x.shape[0]
    return n


def baseline(images: list[Image.Image], processor) -> int:
    n = 0
    for img in images:
        n += processor(images=[img], return_tensors="pt")["pixel_values"].shape[1]
    return n


def rate(fn, rounds: int) -> tuple[float, int]:
    best, crops = float("inf"), 0
    for _ in range(rounds):
        t = time.perf_counter()
        crops = fn()
        best = min(best, time.perf_counter() - t)
    return best, crops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    from transformers import LlavaOnevisionImageProcessor

    processor = LlavaOnevisionImageProcessor()
    arrays = make_images(args.images)
    pils = [Image.fromarray(a) for a in arrays]
    spec = SplitSpec(crop_size=384, grid_min=4, grid_max=9)
    t_base, c_base = rate(lambda: baseline(pils, processor), args.rounds)
    t_ours, c_ours = rate(lambda: ours(arrays, spec), args.rounds)
    print(f"baseline: {type(processor).__name__}: {args.images / t_base:.1f} images/s ({c_base / t_base:.1f} crops/s, {c_base} crops)")
    print(f"mm15 split_image + normalise: {args.images / t_ours:.1f} images/s ({c_ours / t_ours:.1f} crops/s, {c_ours} crops)")
    print(f"ratio mm15 / baseline (images/s): {t_base / t_ours:.2f}  (target >= 1.0)")
    print(f"ratio mm15 / baseline (crops/s):  {(c_ours / t_ours) / (c_base / t_base):.2f}")


if __name__ == "__main__":
    main()
