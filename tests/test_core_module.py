"""The shared LightningModule: freezing contract, parameter groups, optimizer injection, schedules."""

from pathlib import Path

import pytest
import torch

from mm15.base.module import Components, MM15Module

from conftest import tiny_preprocessing, tiny_spec



def _batch(module):
    from mm15.base.data.sample import Media, Sample, Turn
    import numpy as np
    from PIL import Image
    import tempfile

    path = Path(tempfile.mkdtemp()) / "i.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    s = Sample("x", [Turn("user", "<image>\nWhat?"), Turn("assistant", "red")], [Media(str(path))])
    return module.processor.collate([module.processor(s), module.processor(s)])


@pytest.mark.parametrize("frozen", [("vision",), ("vision", "llm"), ("connector",), ()])
def test_freezing_contract(frozen):
    torch.manual_seed(0)
    module = MM15Module(model=tiny_spec(), preprocessing=tiny_preprocessing(),
                        freeze=Components(**{c: c in frozen for c in ("vision", "connector", "llm")}))
    module.configure_model()
    optimizer = module.optimizer_factory(module.parameter_groups())
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    loss = module(_batch(module)).loss
    loss.backward()
    for name, p in module.model.named_parameters():
        assert p.requires_grad == (p.grad is not None), name  # trainable == has a gradient
        if name.split(".")[0] in frozen:
            assert not p.requires_grad, name
    trainable = {n.split(".")[0] for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {"vision", "connector", "llm"} - set(frozen)
    optimizer.step()
    for name, p in module.model.named_parameters():
        if name.split(".")[0] in frozen:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    assert any(not torch.equal(p, before[n]) for n, p in module.model.named_parameters() if p.requires_grad)


def test_parameter_groups_per_component_learning_rate():
    module = MM15Module(model=tiny_spec(), preprocessing=tiny_preprocessing(),
                        learning_rates=Components(vision=1e-6, connector=1e-3))
    module.configure_model()
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert groups["vision"]["lr"] == 1e-6 and groups["connector"]["lr"] == 1e-3 and "lr" not in groups["llm"]
    assert groups["llm_no_decay"]["weight_decay"] == 0.0
    # hidden matrices (Muon's share) apart from embeddings and kernels; the output embedding is not one
    llm = module.model.llm
    assert groups["llm"]["muon"] and not groups["llm_other"]["muon"] and not groups["llm_no_decay"]["muon"]
    assert all(p.ndim == 2 for g in groups.values() if g["muon"] for p in g["params"])
    assert any(p is llm.get_input_embeddings().weight for p in groups["llm_other"]["params"])
    assert not any(p is llm.get_output_embeddings().weight for p in groups["llm"]["params"])
    assert any(p.ndim == 4 for p in groups["connector_other"]["params"])  # the RegStage convolutions
    n_params = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_params == sum(p.numel() for p in module.model.parameters() if p.requires_grad)


def test_everything_frozen_is_refused():
    module = MM15Module(model=tiny_spec(), preprocessing=tiny_preprocessing(),
                        freeze=Components(vision=True, connector=True, llm=True))
    module.configure_model()
    with pytest.raises(ValueError, match="nothing to train"):
        module.parameter_groups()


def test_adafactor_injection_steps_with_per_component_groups():
    from functools import partial

    from transformers.optimization import Adafactor

    module = MM15Module(model=tiny_spec(), preprocessing=tiny_preprocessing(),
                        optimizer=partial(Adafactor, lr=1e-3, scale_parameter=False, relative_step=False),
                        learning_rates=Components(vision=1e-5))
    module.configure_model()
    optimizer = module.optimizer_factory(module.parameter_groups())
    before = module.model.connector.readout[0].weight.detach().clone()
    module(_batch(module)).loss.backward()
    optimizer.step()
    assert not torch.equal(before, module.model.connector.readout[0].weight)
    assert {g["lr"] for g in optimizer.param_groups} == {1e-3, 1e-5}


def schedule_lrs(steps: int = 100, **kwargs) -> list[float]:
    """The learning rate at each of `steps` steps of a `WarmupCosine(total_steps=steps, **kwargs)` at peak 1."""
    from mm15.base.training.optim import WarmupCosine

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosine(opt, total_steps=steps, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_cosine_schedule():
    lrs = schedule_lrs(warmup_steps=10, min_lr_ratio=0.1)
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0  # linear warmup
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone cosine decay


def test_warmup_stable_decay_holds_the_peak_then_decays():
    from mm15.base.training.optim import WarmupCosine

    lrs = schedule_lrs(warmup_steps=10, stable_ratio=0.5)
    assert lrs[9] < 1.0 and all(lr == 1.0 for lr in lrs[10:60])  # warmup, then 50 steps at the peak
    assert lrs[60] == 1.0 and lrs[61] < 1.0 and lrs[80] == pytest.approx(0.5, abs=0.02)  # cosine over 60..100
    assert all(a >= b for a, b in zip(lrs[60:], lrs[61:]))
    with pytest.raises(ValueError, match="stable_ratio"):
        WarmupCosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), total_steps=100, stable_ratio=1.0)
