"""Tiny random parts for tests, demos and benchmarks: no download, no weights.

* `tiny_tokenizer()`: a byte-level tokenizer (256 byte tokens, no merges) with ChatML special tokens
  and a ChatML chat template, built with `tokenizers`. Deterministic, so a checkpoint trained with
  it decodes the same anywhere. `tiny_tokenizer(TINY_WORDS)` (`tokenizer: tiny-words` in a config)
  adds BPE merges that make each listed word one token (digits are never merged, so numbers stay
  one token per digit as in Llama / Qwen): the demos' prompts get about 2x shorter, which is most of
  a tiny model's step time.
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


# Words of the bundled demos' prompts and chat roles (with the space before them where one occurs).
TINY_WORDS = (
    "system\n", "user\n", "assistant\n",
    " a", " an", " the", " of", " in", " on", " is", " are", " what", "What", "What's", "Where", "Which",
    " which", " colour", " color", " shape", " located", " type", " text", " displayed", " element", " widget",
    " widgets", " screen", " List", " all", " with", " their", " locations", " UI", " Boxes", "Boxes",
    " points", " point", " canvas", " image", " video", " most", " often", " frame", " frames",
    " position", " quadrant", " top", " bottom", " left", " right", " field", " field?",
    "Button", "Text", "Icon", "Label", " Button", " Text", " Icon", " Label", " button", " icon", " label",
    "OK", "Add", "Back", "Cancel", " Answer", " answer", " one", " word", ", ", " [", "]?", "].",
)


def _merges(alphabet: list[str], words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and left-to-right prefix merges that make each word one token (digits unmerged)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for word in words:
        if any(ch.isdigit() for ch in word):
            raise ValueError(f"tiny_tokenizer: words must not contain digits, got {word!r}")
        pieces = list(byte_level.pre_tokenize_str(word)[0][0])  # one symbol per byte
        prefix = pieces[0]
        for piece in pieces[1:]:
            if prefix + piece not in vocab:
                vocab[prefix + piece] = len(vocab)
                merges.append((prefix, piece))
            prefix += piece
    return vocab, merges


def tiny_tokenizer(words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    return byte_level_tokenizer(words, eos="<|im_end|>", pad="<|endoftext|>", specials=("<|im_start|>",),
                                template=CHATML_TEMPLATE)


def byte_level_tokenizer(words: tuple[str, ...], eos: str, template: str, pad: str | None = None,
                         bos: str | None = None, specials: tuple[str, ...] = (),
                         added: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the given special tokens (`specials` after eos/pad/bos),
    plain added tokens (`added`, e.g. Qwen3's `<think>`) and chat template (`mm15.base.families`
    builds one per model family this way)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab, merges = _merges(alphabet, words)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, bos_token=bos, unk_token=None)
    fast.add_tokens(list(specials), special_tokens=True)
    if added:
        fast.add_tokens(list(added))
    fast.chat_template = template
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
