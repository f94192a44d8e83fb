"""The lmms-eval model `mm15`: generation and likelihoods of a saved mm15 model on lmms-eval tasks.

    lmms-eval --model mm15 --model_args pretrained=runs/base_demo/model --tasks mm15_shapes \
        --include_path configs/eval/lmms_eval
    accelerate launch --num_processes 8 -m lmms_eval --model mm15 --model_args pretrained=DIR,precision=bf16-mixed \
        --tasks mme,textvqa_val --batch_size 8

Model arguments (`--model_args k=v,...`):
    pretrained: a model directory, an adapter directory or a Lightning checkpoint (`mm15.eval.loading`).
    batch_size: requests per forward pass (lmms-eval's `--batch_size`).
    device: default `cuda` when there is one (one per process under `accelerate launch`), else `cpu`.
    precision: `32-true` (default), `bf16-mixed` or `16-mixed` (autocast, as Lightning's `--trainer.precision`).
    num_frames: frames per video; default the saved spec's; an image model answers videos only with it.
    max_length: the context in tokens; default the saved spec's.
    regions: true for grounding / referring tasks: the box codec's system prompt on every request
        (ScreenSpot's parser reads the default 0-999 canvas boxes as thousandths of the image).
    max_new_tokens: used when a task's `generation_kwargs` give none (default 128).

Requests go through `mm15.eval.requests` (the saved preprocessing, nothing re-implemented) and the
module's own `generate`, so a task's predictions are the strings `mm15 test` writes for the same
records; batches keep the task's order (grouped only by generation settings), so with the
`eval_batch_size` of the test run the batches are the same too.

Several GPUs: data parallel as lmms-eval's own models do it: `accelerate launch` (or torchrun) starts
one process per GPU, each loads the model on its GPU and answers its share of the documents
(`rank`, `world_size`); lmms-eval gathers the results.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from .likelihood import reply_logprobs
from .loading import load_module
from .requests import Request, RequestEncoder

PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _tuples_stringified() -> bool:
    """lmms-eval 0.7.3 passes every answer through `unwrap_generation_output`, which turns a
    (score, is_greedy) tuple into its str(), so multiple_choice's `lls, is_greedy = zip(*results)`
    fails for every model. Its `GenerationResult` wrapper is the one path that hands a value on as it is."""
    try:
        from lmms_eval.api.instance import unwrap_generation_output
    except ImportError:  # versions without it keep tuples
        return False
    return not isinstance(unwrap_generation_output((0.0, True))[0], tuple)


WRAP_SCORES = _tuples_stringified()


class MM15LMM(lmms):
    is_simple = True  # lmms-eval hands it the task's prompt text and visuals, not chat messages

    def __init__(self, pretrained: str, batch_size: int | str = 1, device: str | None = None,
                 precision: str = "32-true", num_frames: int | None = None, max_length: int | None = None,
                 regions: bool = False, max_new_tokens: int = 128, max_batch_size: int | None = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise TypeError(f"mm15 model_args do not take {sorted(unknown)}; see mm15.eval.lmms_model")
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: use one of {sorted(PRECISIONS)}")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size auto is not supported by mm15: give a number")
        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self._device = torch.device(self._pick_device(device))
        self.module = load_module(pretrained, num_frames, max_length).to(self._device)
        self.encoder = RequestEncoder(self.module.processor, str(pretrained), regions=bool(regions))
        self.batch_size_per_gpu = int(batch_size)
        self.autocast_dtype = PRECISIONS[precision]
        self.max_new_tokens = int(max_new_tokens)

    def _pick_device(self, device: str | None) -> str:
        if self._world_size > 1 and torch.cuda.is_available():
            return f"cuda:{self.accelerator.local_process_index}"
        return device or ("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ----- requests ------------------------------------------------------------------------------
    def to_request(self, instance: Instance, continuation: str | None = None) -> Request:
        """`(context, _, doc_to_visual, doc_id, task, split)` -> Request (visuals read from the document)."""
        context, _, doc_to_visual, doc_id, task, split = instance.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return Request(task, split, doc_id, context, visuals, continuation)

    def batches(self, items: list[Any], key: Any = None) -> Iterator[list[int]]:
        """Indices of `items` in chunks of `batch_size`, in order, one group per `key(item)`."""
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(json.dumps(key(item) if key else None, sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                yield indices[start:start + self.batch_size]

    def _on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self._device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device.type, dtype=self.autocast_dtype)

    # ----- lmms-eval's interface -----------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="mm15 generating")
        for chunk in self.batches(requests, key=lambda r: r.args[1]):
            settings = dict(requests[chunk[0]].args[1] or {})
            batch = self._on_device(self.encoder.batch([self.to_request(requests[i]) for i in chunk], generate=True))
            with self._generation(settings), self._autocast():
                texts = self.module.generate(batch)
            for i, text in zip(chunk, texts):
                answers[i] = cut_at_stops(text, settings.get("until"))
                self.cache_hook.add_partial("generate_until", requests[i].args[:2], answers[i])
            progress.update(len(chunk))
        progress.close()
        return answers

    @contextlib.contextmanager
    def _generation(self, settings: dict[str, Any]) -> Iterator[None]:
        """The task's generation settings on the module for one batch (greedy unless temperature > 0)."""
        temperature = float(settings.get("temperature") or 0.0)
        saved, config = self.module.generation, self.module.model.llm.generation_config
        saved_sampling = (config.temperature, config.top_p)
        self.module.generation = replace(
            saved, max_new_tokens=int(settings.get("max_new_tokens") or self.max_new_tokens),
            do_sample=temperature > 0, num_beams=int(settings.get("num_beams") or 1))
        if temperature > 0:  # MM15Module.generate passes no sampling parameters: HF reads them from here
            config.temperature, config.top_p = temperature, settings.get("top_p") or 1.0
        try:
            yield
        finally:
            self.module.generation = saved
            config.temperature, config.top_p = saved_sampling

    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        """(-log p, is_greedy) per request: the negative log-probability of the continuation as the
        reply (summed over its tokens; lower is likelier, since lmms-eval 0.7's multiple_choice
        takes the argmin: its own models return their loss), and whether greedy decoding gives it."""
        items = [self._likelihood_request(r) for r in requests]
        scores: list[Any] = [None] * len(items)
        progress = tqdm(total=len(items), disable=self.rank != 0, desc="mm15 scoring")
        for chunk in self.batches(items):
            batch = self._on_device(self.encoder.batch([items[i] for i in chunk], generate=False))
            with self._autocast():
                for i, (logp, greedy) in zip(chunk, reply_logprobs(self.module, batch)):
                    scores[i] = (-logp, greedy)
            progress.update(len(chunk))
        progress.close()
        if WRAP_SCORES:
            from lmms_eval.api.instance import GenerationResult

            return [GenerationResult(text=score) for score in scores]
        return scores

    def _likelihood_request(self, instance: Instance) -> Request:
        if len(instance.args) == 2:  # ("", choice): a choice's unconditional likelihood (acc_mutual_info)
            context, continuation = instance.args
            return Request(instance.task_name, "", instance.doc_id, context, [], continuation.strip())
        context, target, _, doc_id, task, split = instance.args
        if not isinstance(target, str):  # `doc_to_target` of a loglikelihood task: called on the document
            target = str(target(self.task_dict[task][split][doc_id]))
        # The continuation is the assistant's reply; the space lmms-eval puts before it (the target
        # delimiter) separates it from the context in a plain LM, not in a chat template.
        return self.to_request(instance, continuation=target.strip())

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("mm15 answers one round per request: use tasks with output_type generate_until")


def cut_at_stops(text: str, until: Any) -> str:
    """The text up to the first of the task's stop strings (`until`: a string, a list or None)."""
    for stop in [until] if isinstance(until, str) else (until or []):
        if stop:
            text = text.split(stop)[0]
    return text
