"""Shared fixtures: tiny random parts saved with `save_pretrained` (so tests load them through the
same `from_pretrained` path users take), tiny specs, and a shapes dataset on disk."""

from __future__ import annotations

import os

import pytest
import torch

from mm15.base.connector import ConnectorSpec
from mm15.base.model import LLMSpec, ModelSpec, VisionSpec
from mm15.base.data.processor import PreprocessSpec
from mm15.base.data.splitting import SplitSpec
from mm15.base.tiny import TINY_LLM, TINY_VISION, save_tiny_parts

# One intra-op thread: the tiny models gain little from two, and with two threads per process a
# contended 2-core machine (or the 2-process DDP/FSDP tests) oversubscribes OpenMP and runs ~6x
# slower. Subprocesses inherit the environment variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    """{"vision", "llm", "tokenizer"} directories of tiny random parts."""
    return save_tiny_parts(tmp_path_factory.mktemp("tiny_parts"))


def tiny_spec(connector: str = "c_abstractor", **llm_overrides) -> ModelSpec:
    return ModelSpec(
        vision=VisionSpec(config=dict(TINY_VISION)),
        llm=LLMSpec(config={**TINY_LLM, **llm_overrides}),
        connector=ConnectorSpec(kind=connector, num_tokens=4, hidden_size=32, depth=2),
        tokenizer="tiny",
    )


def tiny_preprocessing(**split) -> PreprocessSpec:
    return PreprocessSpec(split=SplitSpec(**{"crop_size": 32, "grid_min": 1, "grid_max": 4, **split}), max_length=512)


@pytest.fixture
def spec_factory():
    return tiny_spec


def pytest_configure(config):
    config.addinivalue_line("markers", "learns(seconds): trains a demo to its bar; `seconds` is its rough cost, "
                                       "used to start the long tests first, one per worker")


def pytest_collection_modifyitems(config, items):
    """Put the long learning tests at the start of the chunks that pytest-xdist's work-stealing
    scheduler first hands to each worker (it splits the collection into equal contiguous chunks), so
    they start at once, spread over the workers, and the short tests fill in around them."""
    workers = config.getoption("numprocesses", None) or 0
    workers = workers if isinstance(workers, int) and workers > 1 else 1
    cost = {id(i): i.get_closest_marker("learns").kwargs.get("seconds", 60) for i in items
            if i.get_closest_marker("learns")}
    heavy = sorted((i for i in items if id(i) in cost), key=lambda i: -cost[id(i)])
    rest = [i for i in items if id(i) not in cost]
    bins: list[list] = [[] for _ in range(workers)]
    for item in heavy:  # longest first onto the least loaded worker
        min(bins, key=lambda b: sum(cost[id(x)] for x in b)).append(item)
    ordered, remaining = [], len(items)
    for w in range(workers):
        size = remaining // (workers - w)  # the scheduler's first hand-out: remaining // nodes left
        ordered += bins[w] + [rest.pop(0) for _ in range(max(0, min(len(rest), size - len(bins[w]))))]
        remaining -= size
    items[:] = ordered + rest
