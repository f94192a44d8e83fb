"""`mm15 plan`: what a config's data costs, before training, without decoding a pixel.

    mm15 plan --config configs/base/demo.yaml [--split train] [--out DIR]

Each sample goes through the run's own processor with its media measured from headers only
(`TokenCounter`): image sizes from the file header (`plan_split` gives the crops), video frame
counts from the container (`mm15.video.processor.VideoProcessor.measure_media`), then the same
chat template, region text and placeholder expansion as in training, so the count equals
`len(input_ids)` of the processed sample. Per source and overall it reports records and skips (by
reason), text and media tokens, tokens per sample (p50, p90, p99, max), samples over `max_length`
(the processor would skip them), and for a mixture each source's share, draws per epoch and
repetition; then tokens per optimizer step and steps per epoch at the configured batch.
Written: a table on stdout, `<out>/plan_<split>.json` and `<out>/plan_<split>.png` (histogram).
"""

from __future__ import annotations

import collections
import copy
import io
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from mm15.base.data.media import MediaLayout
from mm15.base.data.processor import MediaBlock, MM15Processor
from mm15.base.data.sample import Media, Sample, SampleError, Skip
from mm15.base.data.splitting import plan_split


def image_size(media: Media, sample: Sample) -> tuple[int, int]:
    """(width, height) from the image header (PIL reads no pixel data until asked)."""
    try:
        with Image.open(io.BytesIO(media.data) if media.data is not None else media.path) as im:
            return im.size
    except FileNotFoundError:
        raise sample.error(f"image file not found: {media.path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise sample.error(f"unreadable image {media.path}: {type(e).__name__}: {e}") from None


class TokenCounter:
    """`counter(sample)` -> (tokens, media tokens, crops) as the processor would make them; raises
    `SampleError` where the processor would (never for length: over-long samples are counted)."""

    def __init__(self, processor: MM15Processor):
        self.processor = processor
        self.planner = copy.copy(processor)  # the same hooks, with media measured instead of loaded
        self.planner.spec = replace(processor.spec, max_length=sys.maxsize)
        self.planner.load_media = self.measure_media

    def measure_media(self, sample: Sample, index: int, media: Media) -> MediaBlock:
        if media.kind != "image":
            measure = getattr(self.processor, "measure_media", None)
            if measure is None:
                raise sample.error(f"media {media.path}: kind {media.kind!r} needs its variant processor")
            return measure(sample, index, media)
        p, (w, h) = self.processor, image_size(media, sample)
        split = plan_split(w, h, p.spec.split, len(sample.media) <= p.spec.split.max_images_to_split)
        layout = MediaLayout("image", media.path, split.num_crops, [p.tokens_per_crop] * split.num_crops, (w, h),
                             split.grid if split.has_grid else None)
        return MediaBlock(np.empty((split.num_crops, 0, 0, 3), np.uint8), p.media_text(index, split), layout)

    def __call__(self, sample: Sample) -> tuple[int, int, int]:
        item = self.planner(sample)
        layouts = item["layouts"]
        return len(item["input_ids"]), sum(x.num_placeholders for x in layouts), sum(x.crops for x in layouts)


def summarize(tokens: np.ndarray, media: np.ndarray, max_length: int) -> dict[str, Any]:
    if len(tokens) == 0:
        return {"samples": 0}
    q = np.percentile(tokens, [50, 90, 99])
    return {"samples": int(len(tokens)), "text_tokens": int(tokens.sum() - media.sum()), "media_tokens": int(media.sum()),
            "mean": float(tokens.mean()), "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
            "max": int(tokens.max()), "over_max_length": int((tokens > max_length).sum())}


def count_source(counter: TokenCounter, items: Iterable[Sample | Skip]) -> dict[str, Any]:
    """One source's samples counted: (N,) tokens and media tokens per sample (-1 where it cannot be
    processed: a skip in training), N the samples training would index (caps choose among them),
    and the skips by reason (those of the reader included)."""
    tokens, media, skips = [], [], collections.Counter()
    for item in items:
        if isinstance(item, Skip):
            skips[item.reason.split(":")[0][:80]] += 1
            continue
        try:
            n, m, _ = counter(item)
        except SampleError as e:
            skips[e.reason.split(":")[0][:80]] += 1
            n = m = -1
        tokens.append(n)
        media.append(m)
    return {"tokens": np.asarray(tokens, np.int64), "media": np.asarray(media, np.int64), "skips": dict(skips)}


def plan_data(datamodule: Any, processor: MM15Processor, split: str = "train", world_size: int = 1,
              accumulation: int = 1) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The plan of one split of an `MM15DataModule` (see the module docstring); also the kept
    samples' token counts per source (for the histogram)."""
    from mm15.base.data.datamodule import resolve_media
    from mm15.base.data.drawn import as_mixture, is_sharded, mixture_table
    from mm15.base.data.mixtures import cap_subset, curate, default_name

    counter, max_length = TokenCounter(processor), processor.spec.max_length
    sources = datamodule.sources[split]
    drawn = split == "train" and (datamodule.mixture is not None or any(is_sharded(x) for x in sources))
    entries = as_mixture(datamodule.mixture or sources).entries if drawn else [None] * len(sources)
    rows, per_source, raw, kept_sizes, means = [], {}, [], [], []
    for source, entry in zip(sources, entries):
        root = getattr(source, "media_root", None) or datamodule.media_root
        items = (x if isinstance(x, Skip) else _resolved(x, root, entry, resolve_media, curate) for x in source.read())
        counts = count_source(counter, items)
        keep = cap_subset(len(counts["tokens"]), entry.cap, datamodule.seed, entry.name) if entry else None
        tokens, media = (counts["tokens"], counts["media"]) if keep is None else (counts["tokens"][keep], counts["media"][keep])
        ok = tokens >= 0
        name = entry.name if entry else default_name(source)
        per_source[name] = tokens[ok]
        raw.append(len(counts["tokens"]))
        kept_sizes.append(len(tokens))
        means.append(float(tokens[ok].mean()) if ok.any() else 0.0)
        rows.append({"source": name, "records": len(counts["tokens"]), "skipped": int(sum(counts["skips"].values())),
                     "kept": int(len(tokens)), "skip_reasons": counts["skips"],
                     **summarize(tokens[ok], media[ok], max_length)})
    everything = np.concatenate(list(per_source.values()) or [np.zeros(0, np.int64)])
    overall = summarize(everything, np.zeros_like(everything), max_length)
    overall.pop("text_tokens", None), overall.pop("media_tokens", None)
    for key in ("text_tokens", "media_tokens", "records", "skipped", "kept"):
        overall[key] = sum(r.get(key, 0) for r in rows)
    if drawn:
        mixture = as_mixture(datamodule.mixture or sources, kept_sizes)
        for row, mix in zip(rows, mixture_table(mixture, kept_sizes, raw)):
            row.update(share=mix["share"], draws=mix["draws"], repetition=mix["repetition"])
        epoch = mixture.epoch_size(np.array([r["share"] for r in rows]), kept_sizes)
        mean = float(sum(r["share"] * m for r, m in zip(rows, means)))
    else:
        epoch, mean = overall["samples"], overall.get("mean", 0.0)
    batch = datamodule.global_batch_size or datamodule.batch_size * world_size * accumulation
    steps = {"global_batch": batch, "epoch_samples": int(epoch), "steps_per_epoch": int(epoch // batch),
             "tokens_per_step": mean * batch,
             **padding_estimate(everything, datamodule.batch_size, getattr(datamodule, "packing", None), datamodule.seed)}
    return {"split": split, "max_length": max_length, "sources": rows, "overall": overall, "steps": steps}, per_source


def padding_estimate(tokens: np.ndarray, micro_batch: int, packing: Any, seed: int = 0) -> dict[str, Any]:
    """Padding as a fraction of the tokens a step computes, over shuffled micro-batches of these
    lengths: padded to the longest sample, and packed into rows (`packing`, or rows of 4096)."""
    from mm15.base.data.packing import PackSpec, balanced_rows

    if not len(tokens):
        return {}
    spec = packing or PackSpec(max_tokens=4096)
    order = np.random.default_rng(seed).permutation(len(tokens))
    padded = packed = 0
    for s in range(0, len(order), micro_batch):
        lengths = [int(tokens[i]) for i in order[s:s + micro_batch]]
        padded += len(lengths) * max(lengths)
        rows = balanced_rows(lengths, spec)
        packed += len(rows) * max(sum(lengths[i] for i in r) for r in rows)
    real = int(tokens.sum())
    return {"micro_batch": micro_batch, "pack_tokens": spec.max_tokens,
            "padding_padded": 1 - real / padded, "padding_packed": 1 - real / packed}


def _resolved(sample: Sample, root: str | None, entry: Any, resolve: Any, curate: Any) -> Sample | Skip:
    try:
        sample = resolve(sample, root)
    except SampleError as e:
        return e.as_skip("parse")
    return curate(sample, entry) if entry is not None else sample


def format_plan(report: dict[str, Any]) -> str:
    cols = ["source", "records", "skipped", "kept", "share", "repetition", "text_tokens", "media_tokens",
            "p50", "p90", "p99", "max", "over_max_length"]
    rows = report["sources"] + [{"source": "all", **report["overall"]}]
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    for r in report["sources"]:
        for reason, n in r.get("skip_reasons", {}).items():
            lines.append(f"  skipped {n} x {reason} ({r['source']})")
    s = report["steps"]
    lines.append(f"global batch {s['global_batch']}: {s['tokens_per_step']:.0f} tokens per optimizer step (mean), "
                 f"{s['steps_per_epoch']} steps per epoch of {s['epoch_samples']} samples")
    if "padding_padded" in s:
        lines.append(f"micro-batch {s['micro_batch']}: padding is {100 * s['padding_padded']:.1f}% of the tokens computed; "
                     f"packed into rows of up to {s['pack_tokens']}: {100 * s['padding_packed']:.1f}%")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def draw_histogram(per_source: dict[str, np.ndarray], max_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    values = [v for v in per_source.values() if len(v)]
    if values:
        bins = np.histogram_bin_edges(np.concatenate(values), bins=40)
        ax.hist([v for v in per_source.values() if len(v)], bins=bins, stacked=True,
                label=[k for k, v in per_source.items() if len(v)])
    ax.axvline(max_length, color="red", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plan(report: dict[str, Any], per_source: dict[str, np.ndarray], max_length: int, out: Path,
               split: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"plan_{split}.json", out / f"plan_{split}.png"
    json_path.write_text(json.dumps(report, indent=1))
    draw_histogram(per_source, max_length, png_path)
    return json_path, png_path


def main(argv: list[str]) -> None:
    import argparse

    from mm15.base.data.prepare import load_run

    parser = argparse.ArgumentParser(prog="mm15 plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="train", choices=["train", "val", "test", "predict"])
    parser.add_argument("--out", default=None, help="folder for plan_<split>.json/.png (default: the run folder)")
    ours, rest = parser.parse_known_args(argv)
    cli = load_run(rest)
    dm, trainer = cli.datamodule, cli.trainer
    from mm15.base.data.streams import ShardedSource

    for source in dm.sources[ours.split]:
        if hasattr(source, "prepare") and not isinstance(source, ShardedSource):
            source.prepare()  # e.g. a synthetic split generated once
    world = int(trainer.num_devices) * int(trainer.num_nodes)
    report, per_source = plan_data(dm, cli.model.processor, ours.split, world, int(trainer.accumulate_grad_batches))
    print(format_plan(report))
    out = Path(ours.out or trainer.default_root_dir)
    paths = write_plan(report, per_source, cli.model.processor.spec.max_length, out, ours.split)
    print("written: " + ", ".join(map(str, paths)))
