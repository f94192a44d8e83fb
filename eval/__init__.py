"""mm15 models in lmms-eval, the harness the field reports MLLM results with.

After `pip install -e ".[eval]" && pip install --no-deps lmms-eval==0.7.3`:

    lmms-eval --model mm15 --model_args pretrained=runs/base_demo/model \
        --tasks mm15_shapes --include_path configs/eval/lmms_eval

* `registration`: the `lmms_eval.models` entry point that names the model `mm15` (no import of
  torch or lmms-eval until a run asks for it).
* `loading`: a model directory, an exported adapter or a Lightning checkpoint -> the mm15 module
  (`MM15Module` / `MM15VideoModule`) with the preprocessing spec saved beside the weights.
* `requests`: an lmms-eval request (context text, PIL images, image or video paths) -> an mm15
  `Sample` -> the module's own processor; nothing is preprocessed here.
* `likelihood`: the log-probability of a continuation, for multiple-choice tasks.
* `lmms_model`: the lmms-eval model class (`generate_until`, `loglikelihood`, ranks and devices).
* `tasks`: what the shipped tasks under `configs/eval/lmms_eval/` call (documents from the
  synthetic builders, prompts, mm15's own metrics).
"""
