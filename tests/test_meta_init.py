"""Meta-device initialisation under FSDP2 (`MM15Module(init_on_meta=...)`, 2 CPU processes, gloo).

Each rank builds the module's model on `meta`, shards it and fills its shards from rank 0's one
full CPU build (`mm15.base.training.sharding.init_sharded_from_rank0`). Against the 1-process build
of the same config, for a random-init model (LoRA, frozen tower, activation checkpointing) and for
a `pretrained` directory:

* the full state gathered from the shards, every buffer (rotary `inv_freq`, position ids, which
  no state dict holds) and the frozen-weight fingerprint are equal bit for bit;
* a forward and backward pass give the same loss;
* rank 1 built its model on `meta` only (every `MM15Model.build` it ran returned meta parameters),
  and holds about half of the weights.

The ranks run this file as a script (`python tests/test_meta_init.py <rank> <world> <out>`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm15.base.connector import ConnectorSpec
from mm15.base.data.processor import PreprocessSpec
from mm15.base.data.splitting import SplitSpec
from mm15.base.data.sample import IGNORE_INDEX
from mm15.base.model import LLMSpec, MM15Model, ModelSpec, VisionSpec, load_tokenizer
from mm15.base.module import Components, MM15Module
from mm15.base.tiny import TINY_LLM, TINY_VISION
from mm15.base.training.adapters import LoraSpec

SPEC = ModelSpec(VisionSpec(config=dict(TINY_VISION)), LLMSpec(config=dict(TINY_LLM)),
                 ConnectorSpec(kind="c_abstractor", num_tokens=4, hidden_size=32, depth=1), tokenizer="tiny")
PREPROCESSING = PreprocessSpec(split=SplitSpec(crop_size=32, grid_min=1, grid_max=2))
FROZEN_TOWER = Components(vision=True, connector=False, llm=False)


def make_module(case: str, pretrained: str, **kwargs) -> MM15Module:
    if case == "config":
        return MM15Module(model=SPEC, preprocessing=PREPROCESSING, lora=LoraSpec(r=4, alpha=8, dropout=0.0),
                          freeze=FROZEN_TOWER, activation_checkpointing=True, **kwargs)
    return MM15Module(pretrained=pretrained, preprocessing=PREPROCESSING, freeze=FROZEN_TOWER, **kwargs)


def loss_and_grads(model: MM15Model) -> tuple[float, float]:
    """Loss and squared gradient norm of one fixed batch (one 32-px crop, 6 target tokens)."""
    placeholders = [model.image_token_id] * model.tokens_per_crop
    ids = torch.tensor([[5, 6, 7, *placeholders, *range(20, 30)]])
    labels = ids.clone()
    labels[:, : 3 + len(placeholders) + 4] = IGNORE_INDEX
    pixels = torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32)
    out = model(ids, torch.ones_like(ids), labels=labels, media_features=model.encode_media(pixels))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = sum(float((g.full_tensor() if hasattr(g, "full_tensor") else g).double().square().sum()) for g in grads)
    return float(out.loss), norm


def meta_attributes(model: torch.nn.Module) -> list[str]:
    """Plain tensor attributes (not parameters or buffers) left on `meta`."""
    return [f"{name}.{key}" for name, m in model.named_modules() for key, value in vars(m).items()
            if isinstance(value, torch.Tensor) and value.is_meta]


def tied(model: MM15Model) -> bool:
    out = model.llm.get_output_embeddings()
    return out is not None and out.weight is model.llm.get_input_embeddings().weight


def run_rank(rank: int, world: int, out: str, pretrained: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    builds: list[list[str]] = []
    original = MM15Model.build.__func__

    def recording_build(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        builds.append(sorted({p.device.type for p in model.parameters()}))
        return model

    MM15Model.build = classmethod(recording_build)
    results = {}
    for case in ("config", "pretrained"):
        builds.clear()
        module = make_module(case, pretrained)
        module._device_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
        module.configure_model()
        model = module.model
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        loss, grad_norm = loss_and_grads(model)
        results[case] = {
            "builds": list(builds), "state": state, "local_fraction": local / total,
            "buffers": {n: b.detach().cpu().clone() for n, b in model.named_buffers()},
            "fingerprint": module._frozen_fingerprint, "meta_attributes": meta_attributes(model),
            "tied": tied(model), "loss": loss, "grad_norm": grad_norm,
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        }
    torch.save(results, f"{out}.rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("meta_pretrained") / "model"
    torch.manual_seed(1)
    tokenizer = load_tokenizer(SPEC)
    MM15Model.build(SPEC, tokenizer, crop_size=32).save_pretrained(d, tokenizer)
    return str(d)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, pretrained_dir) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("meta_ranks") / "result"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    env.pop("PL_GLOBAL_SEED", None)
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(out), pretrained_dir], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-6000:]
    return {r: torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in (0, 1)}


@pytest.fixture(scope="module")
def references(pretrained_dir) -> dict[str, dict]:
    """The 1-process builds (no mesh: the plain path)."""
    out = {}
    for case in ("config", "pretrained"):
        module = make_module(case, pretrained_dir)
        module.configure_model()
        out[case] = {"state": {k: v.detach().clone() for k, v in module.model.state_dict().items()},
                     "buffers": {n: b.detach().clone() for n, b in module.model.named_buffers()},
                     "fingerprint": module._frozen_fingerprint,
                     "requires_grad": {n: p.requires_grad for n, p in module.model.named_parameters()}}
        out[case]["loss"], out[case]["grad_norm"] = loss_and_grads(module.model)
    return out


@pytest.mark.parametrize("case", ["config", "pretrained"])
def test_meta_init_equals_one_process_build(case, two_ranks, references):
    ref, got = references[case], two_ranks[0][case]
    assert got["state"].keys() == ref["state"].keys()
    different = [k for k in ref["state"] if not torch.equal(got["state"][k], ref["state"][k])]
    assert not different, different[:5]
    assert ref["buffers"] and "inv_freq" in " ".join(ref["buffers"])
    for rank in (0, 1):
        buffers = two_ranks[rank][case]["buffers"]
        assert buffers.keys() == ref["buffers"].keys()
        assert all(torch.equal(buffers[n], ref["buffers"][n]) for n in buffers), rank
        assert two_ranks[rank][case]["meta_attributes"] == []
        assert two_ranks[rank][case]["tied"]
        assert two_ranks[rank][case]["requires_grad"] == ref["requires_grad"]
        assert two_ranks[rank][case]["fingerprint"] == ref["fingerprint"] and ref["fingerprint"]
        assert abs(two_ranks[rank][case]["loss"] - ref["loss"]) < 1e-5
        assert abs(two_ranks[rank][case]["grad_norm"] - ref["grad_norm"]) < 1e-4 * max(1.0, ref["grad_norm"])


@pytest.mark.parametrize("case", ["config", "pretrained"])
def test_rank1_never_builds_the_full_model(case, two_ranks):
    assert two_ranks[0][case]["builds"] == [["cpu"], ["meta"]]  # rank 0: the full source, then its skeleton
    assert two_ranks[1][case]["builds"] == [["meta"]]
    assert two_ranks[1][case]["local_fraction"] < 0.6


def test_init_on_meta_defaults_and_refusal(tmp_path):
    assert make_module("config", "").init_on_meta is True
    assert make_module("config", "", init_on_meta=False).init_on_meta is False
    with pytest.raises(ValueError, match="init_on_meta"):
        MM15Module(model=SPEC, preprocessing=PREPROCESSING, adapter=str(tmp_path), init_on_meta=True)


if __name__ == "__main__":
    run_rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
