"""Memory and speed of the training data: held in memory vs streamed from prepared shards.

    python benchmarks/data_streaming.py                     # 1M records, 3000 samples loaded per mode
    python benchmarks/data_streaming.py --records 200000 --samples 1000

Writes `--records` synthetic LLaVA-style records (short conversations; one in ten refers to one of
four tiny shared PNGs) as a LLaVA JSONL file, and the same records as Parquet shards
(`mm15.base.data.streams.write_shards`). Then, each mode in a fresh process so one peak cannot hide
the other: build `MM15DataModule` (setup("fit"), the training loader) and load `--samples`
samples through the tiny processor (templating, tokenising, image splitting), once held in memory
(`LlavaJsonSource`: every record parsed into a `Sample`) and once streamed (`ShardedSource`, shuffle
window 1000). It prints each mode's peak resident memory and its growth over the process's memory
right before the data module is built (the peak is reset there, Linux `/proc/self/clear_refs`), the set-up time, the first batch's time (the stream opens its first shard there) and the
loader's samples/s after it, and the streamed / in-memory ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGES = 4


def write_records(root: Path, n: int) -> Path:
    from PIL import Image

    for k in range(IMAGES):
        Image.fromarray(np.full((40 + 8 * k, 56, 3), 60 * k, np.uint8)).save(root / f"img{k}.png")
    path = root / "records.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            question = f"What is item {i} about? Describe it in one sentence."
            row = {"id": f"r{i}", "conversations": [{"from": "human", "value": question},
                                                    {"from": "gpt", "value": f"Item {i} is about topic {i % 97}."}]}
            if i % 10 == 0:
                row["image"] = f"img{i % IMAGES}.png"
                row["conversations"][0]["value"] = "<image>\n" + question
            f.write(json.dumps(row) + "\n")
    return path


def prepare(root: Path, records: int) -> None:
    from mm15.base.data.streams import write_shards
    from mm15.data_builders.llava import LlavaJsonSource

    from mm15.base.data.datamodule import resolve_media

    path = write_records(root, records)
    items = (resolve_media(s, str(root)) for s in LlavaJsonSource(str(path)).read())
    write_shards(items, str(root / "shards"), media_root=str(root), shard_size=20_000)


def rss_kb(field: str) -> int:
    """`VmRSS` (now) or `VmHWM` (peak since the last reset) of this process, in kB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def measure(root: Path, mode: str, samples: int) -> dict:
    """One mode, in this process: peak RSS and loader throughput."""
    import torch

    from mm15.base.data.datamodule import MM15DataModule
    from mm15.base.data.processor import MM15Processor, PreprocessSpec
    from mm15.base.data.splitting import SplitSpec
    from mm15.base.data.streams import ShardedSource
    from mm15.base.model import LLMSpec, ModelSpec, VisionSpec, load_tokenizer
    from mm15.base.tiny import TINY_LLM, TINY_VISION
    from mm15.data_builders.llava import LlavaJsonSource

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(ModelSpec(vision=VisionSpec(config=dict(TINY_VISION)), llm=LLMSpec(config=dict(TINY_LLM)),
                                         tokenizer="tiny"))
    processor = MM15Processor(tokenizer, PreprocessSpec(split=SplitSpec(crop_size=32, grid_min=1, grid_max=4)), 4)
    import datasets  # noqa: F401 - imported in both modes, so neither's growth counts the import

    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) restarts from the current RSS
    base = rss_kb("VmRSS")
    start = time.perf_counter()
    source = (LlavaJsonSource(str(root / "records.jsonl")) if mode == "memory"
              else ShardedSource(str(root / "shards"), shuffle_window=1000))
    dm = MM15DataModule(train=[source], batch_size=8, seed=0)
    dm.processor = processor
    dm.setup("fit")
    loader = dm.train_dataloader()
    setup_s = time.perf_counter() - start
    start, batches = time.perf_counter(), iter(loader)
    next(batches)  # opening the first shard (the stream) or the first worker-less batch: timed apart
    first_s, start, seen = time.perf_counter() - start, time.perf_counter(), 0
    for batch in batches:
        seen += batch["size"]
        if seen >= samples:
            break
    rate = seen / (time.perf_counter() - start)
    peak = rss_kb("VmHWM")
    return {"mode": mode, "peak_mb": peak / 1024, "growth_mb": max(peak - base, 1) / 1024, "setup_s": setup_s,
            "first_batch_s": first_s, "samples_per_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--root", default=None, help="reuse (or keep) the written data here")
    parser.add_argument("--mode", choices=["memory", "stream"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # a child: one mode, result as JSON on stdout
        print(json.dumps(measure(Path(args.root), args.mode, args.samples)))
        return
    root = Path(args.root or tempfile.mkdtemp(prefix="mm15_stream_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "shards" / "mm15_shards.json").exists():
        start = time.perf_counter()
        prepare(root, args.records)
        print(f"wrote {args.records} records as JSONL and as shards in {time.perf_counter() - start:.0f} s ({root})")
    results = {}
    for mode in ("memory", "stream"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--root", str(root), "--samples",
                              str(args.samples)], capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'mode':8s} {'peak RSS MB':>12s} {'growth MB':>10s} {'setup s':>8s} {'1st batch s':>11s} {'samples/s':>10s}")
    for r in results.values():
        print(f"{r['mode']:8s} {r['peak_mb']:12.0f} {r['growth_mb']:10.0f} {r['setup_s']:8.1f} {r['first_batch_s']:11.2f} "
              f"{r['samples_per_s']:10.0f}")
    m, s = results["memory"], results["stream"]
    print(f"streamed / in memory: peak RSS {s['peak_mb'] / m['peak_mb']:.3f}, growth {s['growth_mb'] / m['growth_mb']:.3f}, "
          f"setup {s['setup_s'] / m['setup_s']:.3f}, samples/s {s['samples_per_s'] / m['samples_per_s']:.2f}")


if __name__ == "__main__":
    main()
