"""Tiny random parts for tests, demos and benchmarks: no download, no weights.

* `tiny_tokenizer()`: a byte-level tokenizer (256 byte tokens, no merges) with ChatML special tokens
  and a ChatML chat template, built with `tokenizers`. Deterministic, so a checkpoint trained with
  it decodes the same anywhere.
* `TINY_VISION`, `TINY_LLM`, `TINY_MOE_LLM`: config dicts accepted by `PartSpec.config`.
* `save_tiny_parts(dir)`: writes a tiny vision tower, LLM and tokenizer with `save_pretrained`, so
  tests exercise the same `from_pretrained` path users take with real checkpoints.

    python -m mm15.base.tiny /tmp/tiny   # writes /tmp/tiny/{vision,llm,tokenizer}
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_VISION = {
    "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
}
TINY_LLM = {
    "model_type": "llama", "vocab_size": 262, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096, "tie_word_embeddings": True,
}
TINY_MOE_LLM = {
    "model_type": "mixtral", "vocab_size": 262, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
    "max_position_embeddings": 4096, "tie_word_embeddings": True,
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    fast.add_tokens(["<|im_start|>"], special_tokens=True)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def save_tiny_parts(directory: str | Path, vision: dict | None = None, llm: dict | None = None) -> dict[str, str]:
    """Write tiny random parts under `directory`; returns {"vision", "llm", "tokenizer"} paths."""
    directory = Path(directory)
    paths = {k: str(directory / k) for k in ("vision", "llm", "tokenizer")}
    vision_cfg = dict(vision or TINY_VISION)
    AutoModel.from_config(AutoConfig.for_model(**vision_cfg)).save_pretrained(paths["vision"])
    llm_cfg = dict(llm or TINY_LLM)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**llm_cfg)).save_pretrained(paths["llm"])
    tiny_tokenizer().save_pretrained(paths["tokenizer"])
    return paths


if __name__ == "__main__":
    print(save_tiny_parts(sys.argv[1] if len(sys.argv) > 1 else "tiny_parts"))
