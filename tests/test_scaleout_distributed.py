"""Scale-out end to end on CPU: `mm15 fit` of a tiny LoRA model on mixed image and text-only batches,

* 1 process with gradient accumulation 2 (in this process: the reference),
* 2 processes with DDP and with FSDP2 (gloo), launched as users launch them (`mm15 fit ... --config
  configs/strategies/<strategy>.yaml`): same samples per step, losses and final weights equal to the
  reference, with AdamW and with SGD (AdamW's and Muon's steps do not change when every gradient is
  scaled by a constant, SGD's do: a gradient summed over ranks instead of averaged fails only there),
* a run SIGKILLed half-way through writing a checkpoint, then resumed with `--ckpt_path last`: the
  resumed run reads no sample twice and reproduces the reference loss curve,
* `mm15 export` of the reference: the adapter loads with plain PEFT in a process without mm15, and
  adapter, merged model and trained module agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pytorch_lightning import LightningDataModule

from mm15.base.cli import MM15CLI
from mm15.base.module import MM15Module
from mm15.data_builders.synthetic_shapes import SyntheticShapesSource

from scaleout_support import ROOT, SGD, read_losses, read_parameters, run_cli, tiny_run_config, write_config
from scaleout_support import write_text_only

STRATEGIES = ROOT / "configs" / "strategies"
CPU_TWO = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("scaleout_data")
    write_text_only(d / "text.jsonl", 8)
    SyntheticShapesSource(str(d / "shapes"), "train", 8, min_side=24, max_side=56).prepare()
    return d


def _one_process_run(run: Path, data_dir: Path, *extra: str, optimizer: dict | None = None) -> dict:
    """An uninterrupted 1-process run in this process (6 steps, accumulation 2, checkpoints every 2 steps)."""
    config = write_config(run / "fit.yaml", tiny_run_config(
        run, data_dir, plugins=["mm15.base.training.checkpointing.AtomicCheckpointIO"], optimizer=optimizer))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses, so float results can be compared exactly
    try:
        cli = MM15CLI(MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      auto_configure_optimizers=False, args=["fit", "--config", str(config), *extra])
    finally:
        torch.set_num_threads(threads)
    return {"dir": run, "losses": read_losses(run / "losses"), "module": cli.model,
            "params": read_parameters(run / "params.pt")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The 1-process AdamW run."""
    return _one_process_run(tmp_path_factory.mktemp("reference"), data_dir)


@pytest.fixture(scope="module")
def sgd_reference(tmp_path_factory, data_dir):
    """The 1-process SGD run."""
    return _one_process_run(tmp_path_factory.mktemp("sgd_reference"), data_dir, optimizer=SGD)


def _check_run(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _two_process_run(strategy: str, tmp_path: Path, data_dir: Path, *extra: str, optimizer: dict | None = None
                     ) -> list[dict]:
    config = write_config(tmp_path / "fit.yaml", tiny_run_config(tmp_path, data_dir, optimizer=optimizer))
    args = ["fit", "--config", str(config), "--config", str(STRATEGIES / strategy), *CPU_TWO, *extra]
    _check_run(run_cli(args, tmp_path))
    return read_losses(tmp_path / "losses")


def _compare_to_reference(rows: list[dict], reference: dict) -> float:
    """Micro-batch k of rank r in a 2-process run is micro-batch 2k + r of the reference."""
    ref = reference["losses"]
    ranks = [[r for r in rows if r["rank"] == rank] for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(ref) // 2
    worst = 0.0
    for k, pair in enumerate(zip(*ranks)):
        for rank, row in enumerate(pair):
            expected = ref[2 * k + rank]
            assert row["ids"] == expected["ids"], (k, rank)  # the same samples, step for step
            worst = max(worst, abs(row["loss"] - expected["loss"]))
    assert worst < 1e-4, worst
    mixed = [k for k, (a, b) in enumerate(zip(*ranks)) if (a["crops"] == 0) != (b["crops"] == 0)]
    assert mixed, "no step with a text-only batch on one rank and images on the other: the case that hangs"
    print(f"max |loss - 1-process loss| = {worst:.2e} over {len(ref)} micro-batches; mixed steps {mixed}")
    return worst


def _compare_parameters(run: Path, reference: dict) -> float:
    """The trainable weights after the last update (rank 0's, gathered from the shards) against the 1-process run."""
    params, expected = read_parameters(run / "params.pt"), reference["params"]
    assert params.keys() == expected.keys() and params
    worst = max(float((params[k] - expected[k]).abs().max()) for k in params)
    print(f"max |weight - 1-process weight| = {worst:.2e} over {len(params)} trainable tensors")
    assert worst < 1e-4, worst
    return worst


OPTIMIZERS = {"adamw": "reference", "sgd": "sgd_reference"}
# SGD in the default run: it changes with the gradient's scale, so a summed reduction fails it; AdamW
# (the real runs' optimizer, scale-invariant) in the slow tier.
OPTIMIZER_CASES = [pytest.param("adamw", marks=pytest.mark.slow), "sgd"]


@pytest.mark.parametrize("optimizer", OPTIMIZER_CASES)
def test_ddp_two_processes_match_one_process(optimizer, request, data_dir, tmp_path):
    reference = request.getfixturevalue(OPTIMIZERS[optimizer])
    rows = _two_process_run("ddp.yaml", tmp_path, data_dir, optimizer=SGD if optimizer == "sgd" else None)
    _compare_to_reference(rows, reference)
    _compare_parameters(tmp_path, reference)


@pytest.mark.parametrize("optimizer", OPTIMIZER_CASES)
def test_fsdp2_two_processes_match_one_process(optimizer, request, data_dir, tmp_path):
    """Also with activation checkpointing: recomputation changes no number."""
    reference = request.getfixturevalue(OPTIMIZERS[optimizer])
    rows = _two_process_run("fsdp2.yaml", tmp_path, data_dir, "--model.init_args.activation_checkpointing", "true",
                            optimizer=SGD if optimizer == "sgd" else None)
    _compare_to_reference(rows, reference)
    _compare_parameters(tmp_path, reference)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and last.is_dir()  # one shard per rank, swapped in atomically
    from torch.distributed.checkpoint import FileSystemReader

    keys = [k for k in FileSystemReader(str(last)).read_metadata().state_dict_metadata if k.startswith("state_dict.")]
    assert keys and all("lora_" in k or ".connector." in k for k in keys)  # frozen weights not written
    from mm15.base.training.export import read_checkpoint

    sharded = read_checkpoint(last)["state_dict"]  # what `mm15 export` consolidates
    trained = reference["module"].state_dict()
    worst = max(float((sharded[k] - trained[k]).abs().max()) for k in sharded)
    print(f"FSDP2 final trainable weights vs 1 process: max abs difference {worst:.2e}")
    assert worst < 1e-4, worst


MUON = ["--model.init_args.optimizer.class_path", "mm15.base.training.optim.MuonAdamW"]


def test_fsdp2_with_muon_matches_one_process(reference, data_dir, tmp_path):
    """`MuonAdamW` on FSDP2 shards (each rank orthogonalises the whole gathered update) takes the same
    steps as in one process: Muon on the LoRA matrices and the connector's readout, AdamW on the rest."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    muon = _one_process_run(one, data_dir, *MUON)
    assert [r["ids"] for r in muon["losses"]] == [r["ids"] for r in reference["losses"]]
    assert muon["losses"][-1]["loss"] != reference["losses"][-1]["loss"]  # not AdamW's steps
    _compare_to_reference(_two_process_run("fsdp2.yaml", two, data_dir, *MUON), muon)
    _compare_parameters(two, muon)


def test_kill_while_writing_checkpoint_then_resume_reproduces_the_curve(reference, data_dir, tmp_path):
    plugin = {"class_path": "scaleout_support.DyingCheckpointIO", "init_args": {"die_on_save": 2}}
    killed = write_config(tmp_path / "killed.yaml", tiny_run_config(tmp_path, data_dir, plugins=[plugin]))
    proc = run_cli(["fit", "--config", str(killed)], tmp_path)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL in the middle of the step-4 checkpoint
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "last.ckpt.partial"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 2  # still the complete one
    before = read_losses(tmp_path / "losses")

    resume = write_config(tmp_path / "resume.yaml", tiny_run_config(
        tmp_path, data_dir, plugins=["mm15.base.training.checkpointing.AtomicCheckpointIO"]))
    _check_run(run_cli(["fit", "--config", str(resume), "--ckpt_path", "last"], tmp_path))
    resumed = read_losses(tmp_path / "losses")[len(before):]
    ref = reference["losses"]
    assert [r["ids"] for r in resumed] == [r["ids"] for r in ref[4:]]  # micro-batches 5.. : nothing re-read
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(resumed, ref[4:]))
    print(f"resumed steps 3-6: max |loss - uninterrupted| = {worst:.2e}")
    assert worst < 1e-6


CLEAN_PROCESS = """
import json, sys
sys.modules["mm15"] = None  # the export must load without mm15
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
adapter, merged_llm, ids_path, out_path = sys.argv[1:]
base = AutoModelForCausalLM.from_pretrained(json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"])
llm = PeftModel.from_pretrained(base, adapter).eval()
ids = torch.load(ids_path)
with torch.no_grad():
    out = {"adapter": llm(input_ids=ids).logits,
           "merged": AutoModelForCausalLM.from_pretrained(merged_llm).eval()(input_ids=ids).logits}
torch.save(out, out_path)
"""


def test_export_round_trip_in_a_clean_process(reference, tmp_path):
    from mm15.base.training.export import export
    from mm15.base.model import MM15Model

    written = export(str(reference["dir"] / "checkpoints" / "last.ckpt"), str(tmp_path / "export"))
    adapter, merged = Path(written["adapter"]), Path(written["merged"])
    trained = reference["module"].eval()
    ids = torch.tensor([trained.processor.tokenizer("Count to 3. 1 2 3")["input_ids"]])
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", CLEAN_PROCESS, str(adapter), str(merged / "llm"),
                           str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    clean = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = trained.model.llm(input_ids=ids).logits
    diffs = {k: float((v - expected).abs().max()) for k, v in clean.items()}

    # The whole multimodal model: trained module, merged directory, adapter directory through mm15.
    batch = trained.processor.collate([trained.processor(s) for s in _image_and_text_samples(tmp_path)])
    with torch.no_grad():
        losses = {"trained": trained(dict(batch)).loss}
        model = MM15Model.from_pretrained(merged)[0].eval()
        features = model.encode_media(trained.processor.normalize(batch["pixel_values"]))
        losses["merged"] = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                                 media_features=features).loss
        from_adapter = MM15Module(adapter=str(adapter))
        from_adapter.configure_model()
        losses["adapter"] = from_adapter.eval()(dict(batch)).loss
    diffs.update({f"loss_{k}": abs(float(v - losses["trained"])) for k, v in losses.items()})
    print("export max abs differences:", diffs)
    assert max(diffs.values()) < 1e-4, diffs
    meta = json.loads((adapter / "mm15_adapter.json").read_text())
    assert meta["preprocessing"]["split"]["crop_size"] == 32 and (adapter / "connector.safetensors").exists()


def _image_and_text_samples(tmp_path):
    import numpy as np
    from PIL import Image

    from mm15.base.data.sample import Media, Sample, Turn

    Image.fromarray(np.random.RandomState(1).randint(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    return [Sample("i", [Turn("user", "<image>\nWhat colour?"), Turn("assistant", "red")], [Media(str(tmp_path / "i.png"))]),
            Sample("t", [Turn("user", "Count to 2."), Turn("assistant", "1 2")], [])]


def test_adapter_onto_another_base_is_refused(reference, tmp_path):
    from mm15.base.training.export import export
    from mm15.base.model import LLMSpec, ModelSpec

    adapter = export(str(reference["dir"] / "checkpoints" / "last.ckpt"), str(tmp_path / "export"), kind="adapter")
    spec = reference["module"].model_spec
    other = ModelSpec(vision=spec.vision, llm=LLMSpec(config={**spec.llm.config, "initializer_range": 0.5}),
                      connector=spec.connector, tokenizer="tiny")
    module = MM15Module(model=other, adapter=adapter["adapter"])
    with pytest.raises(ValueError, match="exported from a different base LLM.*Load it onto the base it was trained on"):
        module.configure_model()
