"""`MM15Module(compile=True)` under FSDP2 (2 CPU processes, gloo): each tower and LLM block is
compiled after sharding and activation checkpointing, and two SGD steps give the losses and the
gradient norms of the same sharded model run eagerly. Slow (inductor compiles on every rank).

The ranks run this file as a script (`python tests/test_compile_fsdp2.py <rank> <world> <out>`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from test_meta_init import free_port, loss_and_grads, make_module


def two_steps(module) -> list[tuple[float, float]]:
    optimizer = torch.optim.SGD([p for p in module.model.parameters() if p.requires_grad], lr=0.05)
    out = []
    for _ in range(2):
        optimizer.zero_grad()
        out.append(loss_and_grads(module.model))
        optimizer.step()
    return out


def run_rank(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for compiled in (False, True):
        module = make_module("config", "", compile=compiled)
        module._device_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
        module.configure_model()
        blocks = [m for m in module.model.modules() if type(m).__name__.endswith("DecoderLayer")]
        results[compiled] = {"steps": two_steps(module), "compiled": bool(blocks) and all("forward" in vars(b) for b in blocks)}
    torch.save(results, f"{out}.rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_blocks_under_fsdp2_match_eager(tmp_path):
    out = tmp_path / "result"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path])}
    env.pop("PL_GLOBAL_SEED", None)
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-6000:]
    for rank in (0, 1):
        got = torch.load(f"{out}.rank{rank}.pt", weights_only=False)
        assert got[True]["compiled"] and not got[False]["compiled"]
        compiled, eager = (sum(got[c]["steps"], ()) for c in (True, False))  # (loss, grad norm) per step
        assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5), (rank, got)
        assert eager[2] < eager[0]  # the steps moved the model


if __name__ == "__main__":
    run_rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
