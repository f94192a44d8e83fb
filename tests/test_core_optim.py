"""`MuonAdamW`: the same steps as torch's Muon and AdamW, orthogonalised updates, and checkpoints that resume."""

import pytest
import torch

from mm15.base.module import MM15Module
from mm15.base.training.optim import MuonAdamW, orthogonalize

from conftest import tiny_preprocessing, tiny_spec
from test_core_module import _batch


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 32, generator=g).requires_grad_(), torch.randn(40, 8, generator=g).requires_grad_(),
            torch.randn(7, generator=g).requires_grad_()]


# Users may keep an older CUDA torch (no torch.optim.Muon before 2.9); MuonAdamW itself does not need it.
# The pinned torch 2.13 of constraints-cpu.txt has it, so this comparison runs in CI.
@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_steps_match_torch_muon_and_adamw():
    ours, theirs = _params(), _params()
    opt = MuonAdamW([{"params": ours[:2], "muon": True}, {"params": ours[2:], "weight_decay": 0.0}],
                    lr=1e-2, weight_decay=0.1, ns_dtype="bfloat16")  # torch iterates in bfloat16
    muon = torch.optim.Muon(theirs[:2], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(theirs[2:], lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step(), muon.step(), adamw.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], _params()[0])


def test_orthogonalize_flattens_the_spectrum_and_keeps_the_directions():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(24, 24, generator=g))
    v, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    s = torch.logspace(0, -2, 12)  # condition number 100
    m = u[:, :12] @ torch.diag(s) @ v.T
    out = orthogonalize(m)
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.5 and sv.max() < 1.5  # the quintic iteration's band around 1
    aligned = u[:, :12].T @ out @ v  # the same singular vectors: diagonal in m's basis
    assert (aligned - torch.diag(torch.diagonal(aligned))).abs().max() < 1e-3
    assert out.shape == m.shape and orthogonalize(m.T).shape == m.T.shape


def test_rejects_what_muon_cannot_update():
    with pytest.raises(ValueError, match="2-D matrices only"):
        MuonAdamW([{"params": [torch.zeros(3, 3, 3, requires_grad=True)], "muon": True, "name": "conv"}])
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        MuonAdamW([torch.zeros(2, 2, requires_grad=True)], adjust_lr_fn="spectral")


def _step(module, optimizer, batch):
    optimizer.zero_grad()
    module(batch).loss.backward()
    optimizer.step()


def test_module_groups_train_and_resume_from_a_state_dict():
    """On the module's groups: Muon moves the hidden matrices, AdamW the rest; a state_dict reloaded into a
    fresh optimizer continues exactly as the uninterrupted one."""
    torch.manual_seed(0)
    a = MM15Module(model=tiny_spec(), preprocessing=tiny_preprocessing())
    a.configure_model()
    b = MM15Module(model=tiny_spec(), preprocessing=tiny_preprocessing())
    b.configure_model()
    b.model.load_state_dict(a.model.state_dict())
    batch = _batch(a)
    opt_a = MuonAdamW(a.parameter_groups(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in a.model.named_parameters()}
    _step(a, opt_a, batch)
    assert all(not torch.equal(p, before[n]) for n, p in a.model.named_parameters() if p.grad is not None)
    kinds = {len(s) for s in opt_a.state.values()}
    assert kinds == {1, 3}  # Muon: a momentum buffer; AdamW: step and two moments

    opt_b = MuonAdamW(b.parameter_groups(), lr=1e-3)
    _step(b, opt_b, batch)
    opt_b2 = MuonAdamW(b.parameter_groups(), lr=1e-3)
    opt_b2.load_state_dict(opt_b.state_dict())
    _step(a, opt_a, batch)
    _step(b, opt_b2, batch)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
