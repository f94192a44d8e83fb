"""Chat templates of any model family: system-role rules and assistant-only labels.

The processor renders every chat with the tokenizer's own template (`apply_chat_template`). Templates
differ in ways that matter for training, and none is refused:

* **No system role.** Gemma 2's template raises on a system turn; Mistral's puts the system text
  before the last user turn only, so a chat that ends with the reply loses it. `fit` then folds the
  system text (mm15's box convention, `preprocessing.system_prompt`) into the first user turn,
  as Gemma 3's own template does.
* **Not prefix-stable.** Labels cover exactly what the model must write after the generation
  prompt: the reply and the text that closes it. Rendering turn by turn finds that when each
  rendering extends the previous one (ChatML, Llama 3, Gemma). Templates that rewrite earlier turns
  (Qwen3 drops the empty thinking block of earlier replies, Phi-3 ends a chat with an extra end
  token) are rendered once with every message replaced by a marker; each reply is then labelled
  with what follows the generation prompt in that rendering and the closing text its template gives
  a last reply.

    chat = ChatTemplate(tokenizer, {"enable_thinking": False})
    messages = chat.fit(messages)
    for text, is_target in chat.segments(messages, generate=False): ...
"""

from __future__ import annotations

import logging
from typing import Any

from jinja2 import TemplateError

log = logging.getLogger(__name__)
PROBE = "[[mm15 system probe]]"


class TemplateRefused(ValueError):
    """The template raised on these turns (e.g. roles that do not alternate)."""


class ChatTemplate:
    def __init__(self, tokenizer: Any, kwargs: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.kwargs = dict(kwargs or {})
        self._system_role: bool | None = None

    def render(self, messages: list[dict[str, str]], generation: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                                      **self.kwargs)
        except TemplateError as e:
            raise TemplateRefused(f"the chat template refused these turns ({[m['role'] for m in messages]}): {e}") from None

    @property
    def system_role(self) -> bool:
        """Whether a system turn survives both a training rendering and a generation prompt."""
        if self._system_role is None:
            turns = [{"role": "system", "content": PROBE}, {"role": "user", "content": "u"}]
            try:
                self._system_role = all(PROBE in text for text in (
                    self.render(turns + [{"role": "assistant", "content": "a"}]), self.render(turns, generation=True)))
            except TemplateRefused:
                self._system_role = False
        return self._system_role

    def fit(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """Fold a leading system turn into the first user turn when the template has no system role."""
        if not messages or messages[0]["role"] != "system" or self.system_role:
            return messages
        system, rest = messages[0]["content"], messages[1:]
        if rest and rest[0]["role"] == "user":
            return [{**rest[0], "content": system + "\n\n" + rest[0]["content"]}] + rest[1:]
        return [{"role": "user", "content": system}] + rest

    def segments(self, messages: list[dict[str, str]], generate: bool) -> list[tuple[str, bool]]:
        """The rendered chat as (text, is_target) pieces, in order; targets are the assistant replies
        and their closing text."""
        stable = self._turn_by_turn(messages, generate)
        if stable is not None:
            return stable
        log.debug("chat template is not prefix-stable; labelling replies from one rendering with markers")
        return self._with_markers(messages, generate)

    def _turn_by_turn(self, messages: list[dict[str, str]], generate: bool) -> list[tuple[str, bool]] | None:
        out: list[tuple[str, bool]] = []
        done = ""
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = self.render(messages[:k], generation=True)
            full = self.render(messages[: k + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                return None
            out += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        tail = self.render(messages, generation=generate)
        if not tail.startswith(done):
            return None
        return out + [(tail[len(done):], False)]

    def _with_markers(self, messages: list[dict[str, str]], generate: bool) -> list[tuple[str, bool]]:
        marks = [f"[[mm15 message {i}]]" for i in range(len(messages))]
        masked = [{**m, "content": mark} for m, mark in zip(messages, marks)]
        full = self.render(masked, generation=generate)
        out: list[tuple[str, bool]] = []
        pos = 0
        for i, (msg, mark) in enumerate(zip(messages, marks)):
            at = full.find(mark, pos)
            if at < 0:
                raise TemplateRefused(f"the chat template leaves out turn {i} ({msg['role']}) when the chat goes on")
            before, target = full[pos:at], msg["role"] == "assistant"
            head = self._after(self.render(masked[:i], generation=True), marks[i - 1] if i else None) if target else ""
            lead = len(head) if target and before.startswith(head) else len(before)
            out += [(before[:lead], False), (before[lead:], True), (msg["content"], target)]
            pos = at + len(mark)
            if target:  # the closing text a last reply gets, as far as this rendering agrees with it
                nxt = full.find(marks[i + 1], pos) if i + 1 < len(marks) else len(full)
                closing = self._after(self.render(masked[: i + 1]), mark)
                n = self._safe_cut(full[pos:nxt], _common_prefix(full[pos:nxt], closing))
                out.append((full[pos:pos + n], True))
                pos += n
        return [(text, target) for text, target in out + [(full[pos:], False)] if text]

    @staticmethod
    def _after(text: str, mark: str | None) -> str:
        return text if mark is None else text[text.index(mark) + len(mark):]

    def _safe_cut(self, text: str, n: int) -> int:
        """`n`, moved back to the start of an added token (`<|user|>`, ...) that it would cut in two."""
        for token in self.tokenizer.get_added_vocab():
            start = text.find(token)
            while start >= 0:
                if start < n < start + len(token):
                    n = start
                start = text.find(token, start + 1)
        return n


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
