"""Tiny random parts of the model families users pick: towers, LLMs and their tokenizers.

Each LLM family gets a tiny config of its own architecture and a byte-level tokenizer (built
offline with `tokenizers`, `mm15.base.tiny.byte_level_tokenizer`) carrying a chat template in that
family's format: its role headers, its rule for system turns and its generation prompt. They are
what `tests/test_families.py` builds, trains, saves, reloads, generates with and exports (the
README's compatibility table); in a config, `tokenizer: tiny:<family>` builds one.

    tok = family_tokenizer("gemma2")                 # <start_of_turn>user ... ; no system role
    llm = family_llm_config("gemma2")                # {"model_type": "gemma2", ...}
    vision = TOWERS["siglip2"]                       # {"model_type": "siglip2_vision_model", ...}

| family | model_type | template, in short |
| --- | --- | --- |
| llama3 | llama | `<|start_header_id|>role<|end_header_id|>\\n\\n ... <|eot_id|>`, system allowed |
| qwen2 | qwen2 | ChatML; a default system turn when none is given (Qwen2.5) |
| qwen3, qwen3_moe | qwen3, qwen3_moe | ChatML; the last reply after a question carries an (empty) thinking block |
| gemma2 | gemma2 | `<start_of_turn>user|model`; a system turn raises (and the class needs `attn_implementation: eager`) |
| gemma3 | gemma3_text | as Gemma 2; the system text is put into the first user turn |
| phi3 | phi3 | `<|user|>\\n ... <|end|>\\n`; a rendering that ends with a reply gets an extra end token |
| mistral | mistral | `[INST] ... [/INST] reply</s>`; the system text goes only before the last user turn |
| smollm3 | smollm3 | ChatML with a metadata system block; no-thinking replies carry an empty thinking block |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerFast

from mm15.base.tiny import byte_level_tokenizer

LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}{% if not (message['role'] == 'system' and loop.first) %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN3_TEMPLATE = (
    "{% set ns = namespace(last_query=-1) %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and loop.index0 > ns.last_query %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)

GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

MISTRAL_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('After the optional system message, conversation roles must alternate user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.last and system_message is defined %}{{ '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}"
    "{% endfor %}"
)

SMOLLM3_TEMPLATE = (
    "{% set thinking = not (enable_thinking is defined and enable_thinking is false) %}"
    "{% set custom = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{{ '<|im_start|>system\n## Metadata\n\nReasoning Mode: ' + ('/think' if thinking else '/no_think')"
    " + '\n\n## Custom Instructions\n\n' + custom + '\n\n<|im_end|>\n' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|im_start|>user\n' + message['content'] + '<|im_end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' + ('' if thinking else '<think>\n\n</think>\n') + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' + ('' if thinking else '<think>\n\n</think>\n') }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """A model family: tiny LLM config fields beyond the common ones, its tokenizer's tokens and the
    attention implementation its transformers class accepts (`LLMSpec.attn_implementation`)."""

    model_type: str
    template: str
    eos: str
    pad: str | None = None
    bos: str | None = None
    specials: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    llm: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "sdpa"


CHATML = dict(eos="<|im_end|>", pad="<|endoftext|>", specials=("<|im_start|>",))
GEMMA = dict(eos="<end_of_turn>", pad="<pad>", bos="<bos>", specials=("<start_of_turn>", "<eos>"))
FAMILIES: dict[str, Family] = {
    "llama3": Family("llama", LLAMA3_TEMPLATE, eos="<|eot_id|>", bos="<|begin_of_text|>",
                     specials=("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>")),
    "qwen2": Family("qwen2", QWEN2_TEMPLATE, **CHATML),
    "qwen3": Family("qwen3", QWEN3_TEMPLATE, **CHATML, added=("<think>", "</think>"), llm={"head_dim": 8}),
    "gemma2": Family("gemma2", GEMMA2_TEMPLATE, **GEMMA, llm={"head_dim": 8}, attn_implementation="eager"),  # no SDPA
    "gemma3": Family("gemma3_text", GEMMA3_TEMPLATE, **GEMMA, llm={"head_dim": 8}),
    "phi3": Family("phi3", PHI3_TEMPLATE, eos="<|endoftext|>", pad="<|endoftext|>",
                   specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "mistral": Family("mistral", MISTRAL_TEMPLATE, eos="</s>", bos="<s>", specials=("[INST]", "[/INST]")),
    "smollm3": Family("smollm3", SMOLLM3_TEMPLATE, eos="<|im_end|>", pad="<|im_end|>",
                      specials=("<|im_start|>",), added=("<think>", "</think>")),
    "qwen3_moe": Family("qwen3_moe", QWEN3_TEMPLATE, **CHATML, added=("<think>", "</think>"),
                        llm={"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                             "decoder_sparse_step": 1}),
}

# Every family's LLM: 2 layers of width 32, token ids set by the tokenizer (None here).
COMMON_LLM = {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
              "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}

# Towers of width 32 reading 32-px crops as 4 x 4 patches of 8 px (SigLIP2: 16 patches, its NaFlex count).
_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8}
TOWERS: dict[str, dict[str, Any]] = {
    "clip": {"model_type": "clip_vision_model", **_TOWER, "image_size": 32},
    "siglip": {"model_type": "siglip_vision_model", **_TOWER, "image_size": 32},
    "siglip2": {"model_type": "siglip2_vision_model", **_TOWER, "num_patches": 16},
    "dinov2": {"model_type": "dinov2", **_TOWER, "image_size": 32},
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} for a tiny tokenizer and chat template: choose one of "
                         f"{', '.join(FAMILIES)} (e.g. `tokenizer: tiny:{next(iter(FAMILIES))}`), or give the "
                         "tokenizer directory of your model")
    return FAMILIES[name]


def family_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with family `name`'s special tokens and chat template."""
    f = family(name)
    return byte_level_tokenizer((), eos=f.eos, template=f.template, pad=f.pad, bos=f.bos, specials=f.specials,
                                added=f.added)


def family_llm_config(name: str) -> dict[str, Any]:
    """A tiny random-init config of family `name`'s architecture (for `LLMSpec.config`)."""
    f = family(name)
    return {"model_type": f.model_type, **COMMON_LLM, **f.llm}
