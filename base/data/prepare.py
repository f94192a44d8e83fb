"""`mm15 prepare`: write every `ShardedSource` of a config as Parquet shards, once.

    mm15 prepare --config configs/base/demo_streaming.yaml [--out DIR] [--shard_size 10000]

For each split, each `mm15.base.data.streams.ShardedSource` (also inside a mixture) reads its
`source` (after that source's own `prepare()`, e.g. generating a synthetic split), resolves media
paths under the media root, measures every sample with the run's processor (headers only,
`mm15.base.data.plan.TokenCounter`) and writes the shards to its `shards` location (or to
`DIR/<name of that location>`), with a progress bar. Records that cannot be used (a malformed
line, a missing image, longer than `max_length`, ...) are written to the run's quarantine file
(`<trainer.default_root_dir>/quarantine.jsonl`) and counted in the manifest. Other arguments
(`--data.init_args...`) override the config as for `mm15 fit`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mm15.base.data.sample import Sample


def load_run(args: list[str]) -> Any:
    """The config's module, data module and trainer, built as `mm15 fit` builds them (no run)."""
    from pytorch_lightning import LightningDataModule

    from mm15.base.cli import MM15CLI
    from mm15.base.module import MM15Module

    cli = MM15CLI(MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  auto_configure_optimizers=False, run=False, args=args,
                  trainer_defaults={"logger": False})
    cli.datamodule.processor = cli.model.processor
    return cli


def sharded_sources(datamodule: Any) -> list[tuple[str, Any]]:
    from mm15.base.data.streams import ShardedSource

    found: dict[str, tuple[str, Any]] = {}
    for split, sources in datamodule.sources.items():
        for source in sources:
            if isinstance(source, ShardedSource):
                found.setdefault(source.shards, (split, source))  # predict may read the test shards
    return list(found.values())


def prepare_source(sharded: Any, datamodule: Any, processor: Any, out: str | None = None,
                   shard_size: int = 10_000, progress: bool = True) -> dict[str, Any]:
    """Write one sharded source from its origin; returns the manifest."""
    from tqdm import tqdm

    from mm15.base.data.datamodule import DataErrorBudgetExceeded, resolve_media
    from mm15.base.data.plan import TokenCounter
    from mm15.base.data.sample import SampleError, Skip
    from mm15.base.data.streams import processing_spec, write_shards

    origin = sharded.source
    if origin is None:
        raise ValueError(f"{sharded.shards}: no `source` to prepare it from (give the ShardedSource a `source`)")
    if hasattr(origin, "prepare"):
        origin.prepare()
    root = getattr(origin, "media_root", None) or datamodule.media_root
    counter, limit = TokenCounter(processor), processor.spec.max_length

    def resolved(items: Any) -> Any:
        for item in items:
            if isinstance(item, Skip):
                yield item
                continue
            try:
                yield resolve_media(item, root)
            except SampleError as e:
                yield e.as_skip("parse")

    def measure(sample: Sample) -> int:
        n = counter(sample)[0]
        if n > limit:
            raise sample.error(f"sequence of {n} tokens exceeds max_length {limit}; skipped, not truncated")
        return n

    target = sharded.shards if out is None else str(Path(out) / Path(sharded.shards.rstrip("/")).name)
    skips: list[Skip] = []
    bar = tqdm(resolved(origin.read()), desc=f"prepare {target}", unit=" records", disable=not progress)
    manifest = write_shards(bar, target, media_root=root, shard_size=shard_size, spec=processing_spec(processor),
                            measure=measure, on_skip=skips.append, storage_options=sharded.storage_options,
                            origin=type(origin).__name__)
    try:
        datamodule.quarantine.record(skips, seen=manifest["records"] + manifest["skipped"])
    except DataErrorBudgetExceeded as e:  # the shards are written; training from them will not see these
        print(f"warning: {e}")
    sharded._manifest = None  # read again from where it was written
    return {**manifest, "target": target}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="mm15 prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write every sharded source under this folder instead")
    parser.add_argument("--shard_size", type=int, default=10_000, help="records per shard")
    ours, rest = parser.parse_known_args(argv)
    cli = load_run(rest)
    dm = cli.datamodule
    if dm.quarantine.path is None:
        dm.quarantine.path = Path(cli.trainer.default_root_dir) / "quarantine.jsonl"
    todo = sharded_sources(dm)
    if not todo:
        raise SystemExit("mm15 prepare: the config has no mm15.base.data.streams.ShardedSource to write")
    for split, sharded in todo:
        m = prepare_source(sharded, dm, cli.model.processor, ours.out, ours.shard_size)
        print(f"{split}: {m['records']} records in {len(m['shards'])} shards at {m['target']}; "
              f"{m['skipped']} skipped (listed in {dm.quarantine.path})")
