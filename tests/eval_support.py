"""Running lmms-eval in-process on the shipped tasks (configs/eval/lmms_eval/), for the tests that
compare its predictions and scores with `mm15 test`'s."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

TASKS = Path(__file__).resolve().parents[1] / "configs" / "eval" / "lmms_eval"
LMMS_EVAL_MISSING = None if importlib.util.find_spec("lmms_eval") else (
    "lmms_eval is not installed: pip install -e \".[eval]\" && pip install --no-deps lmms-eval==0.7.3")


def run_lmms_eval(model_args: str, task: str, limit: int, batch_size: int) -> tuple[list[Any], dict[str, Any]]:
    """(predictions by document order, the task's metrics) of `lmms-eval --model mm15 --model_args
    MODEL_ARGS --tasks TASK --include_path configs/eval/lmms_eval --limit LIMIT --batch_size B`."""
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS), include_defaults=False, model_name="mm15")
    out = evaluator.simple_evaluate(model="mm15", model_args=model_args, tasks=[task], limit=limit,
                                    batch_size=batch_size, task_manager=manager, log_samples=True,
                                    bootstrap_iters=0)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    predictions = [s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
                   for s in samples]
    return predictions, out["results"][task]
