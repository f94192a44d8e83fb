"""The optional pieces of the GPU training path, as far as a CPU can check them:

* `llm.fused_loss` (liger-kernel's fused linear cross-entropy): refused at build time, naming the
  option and what to install, without liger-kernel or CUDA; on a GPU (`-m gpu`) the same loss and
  gradients as the plain target-position loss, for `token` and `sample` reductions;
* `MM15Module(compile=True)` (every tower and LLM block compiled): two SGD steps give the eager
  losses.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mm15.base.connector import ConnectorSpec
from mm15.base.data.processor import PreprocessSpec
from mm15.base.data.sample import IGNORE_INDEX
from mm15.base.data.splitting import SplitSpec
from mm15.base.model import LLMSpec, MM15Model, ModelSpec, VisionSpec, load_tokenizer
from mm15.base.module import MM15Module
from mm15.base.tiny import TINY_LLM, TINY_VISION

SPEC = ModelSpec(VisionSpec(config=dict(TINY_VISION)), LLMSpec(config=dict(TINY_LLM)),
                 ConnectorSpec(kind="c_abstractor", num_tokens=4, hidden_size=32, depth=1), tokenizer="tiny")


def with_llm(**changes) -> ModelSpec:
    return dataclasses.replace(SPEC, llm=dataclasses.replace(SPEC.llm, **changes))


def batch(model: MM15Model, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Two samples of one 32-px crop each, answers of 6 and 3 target tokens (so the reductions differ)."""
    media = [model.image_token_id] * model.tokens_per_crop
    rows = [[5, 6, *media, *range(20, 30)], [7, 8, *media, *range(40, 50)]]
    ids = torch.tensor(rows, device=device)
    labels = ids.clone()
    labels[:, : 2 + len(media) + 4] = IGNORE_INDEX
    labels[1, -3:] = IGNORE_INDEX
    pixels = torch.linspace(-1, 1, 2 * 3 * 32 * 32, device=device).reshape(2, 3, 32, 32)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels}


def test_fused_loss_without_liger_or_cuda_is_refused_at_build():
    try:
        import liger_kernel  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("liger-kernel and CUDA are both here: nothing to refuse")
    except ImportError:
        pass
    spec = with_llm(fused_loss=True)
    with pytest.raises(RuntimeError, match="fused_loss") as info:
        MM15Model.build(spec, load_tokenizer(spec), crop_size=32)
    assert "pip install liger-kernel" in str(info.value) and "CUDA" in str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_fused_loss_matches_plain_loss_and_gradients(reduction):
    pytest.importorskip("liger_kernel")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    results = []
    for fused in (False, True):
        spec = with_llm(fused_loss=fused, loss_reduction=reduction)
        torch.manual_seed(0)
        model = MM15Model.build(spec, load_tokenizer(spec), crop_size=32).cuda()
        b = batch(model, "cuda")
        out = model(b["input_ids"], b["attention_mask"], labels=b["labels"], pixel_values=b["pixel_values"])
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def two_sgd_steps(module: MM15Module) -> list[float]:
    module.configure_model()
    model = module.model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(2):
        b = batch(model)
        out = model(b["input_ids"], b["attention_mask"], labels=b["labels"], pixel_values=b["pixel_values"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss.detach()))
    return losses


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    preprocessing = PreprocessSpec(split=SplitSpec(crop_size=32, grid_min=1, grid_max=2))
    eager = two_sgd_steps(MM15Module(model=SPEC, preprocessing=preprocessing, activation_checkpointing=True))
    torch._dynamo.reset()
    module = MM15Module(model=SPEC, preprocessing=preprocessing, activation_checkpointing=True, compile=True)
    compiled = two_sgd_steps(module)
    assert all("forward" in vars(block) for block in module.model.llm.model.layers)  # compiled in place
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5), (compiled, eager)
