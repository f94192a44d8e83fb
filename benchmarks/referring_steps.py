"""How many optimizer steps a tiny from-scratch LLM needs to learn text-coordinate referring.

Referring in the UI demo (widget classification / OCR at a point given as text) is a two-step lookup:
read the coordinates, then attend to that region. This benchmark takes the vision side out of the
question: the image tokens are ideal features (a row's token = a random "kind" vector + a random "row"
vector, 4 rows, 4 kinds, each kind once per screen, so naming anything on screen is chance), and only
the tiny Llama (the demo's shape: hidden 64, 4 heads) has to learn "[x, y] in the question -> the kind
in that row". Prompt and question are the demo's (system prompt, Ferret-UI phrasing, 0-999 canvas,
`tiny-words` tokenizer). Controls, measured in the same run with the same model and optimizer:

    fixed_row   the answer is always the top row's kind: a lookup by position, no coordinates to read
    text_only   the layout never changes: the answer follows from the coordinates, no image to read
    row_index   the question names the row by its number (1-4) instead of coordinates: the lookup
                alone, without parsing a 0-999 number
    referring   both: read the coordinates, then look up that row of the image (the real task)

It prints, per task and depth, the first evaluated step at which held-out accuracy reaches 2x chance
(0.5) and the accuracy at the end. `--init 0.1 --lr 4e-3 --batch 32 --clip 1 --cosine` is the UI demo's
earlier AdamW recipe; `--optimizer muon` swaps in `mm15.base.training.optim.MuonAdamW`. Current figures are
in the README ("Benchmarks"), earlier ones in docs/experiments.md.

    python benchmarks/referring_steps.py [--steps 3000] [--layers 2 3] [--seed 0] [--init 0.02] [--clip 0]
        [--cosine] [--row_scale 1.0] [--heads 4] [--kv_heads 2] [--optimizer adamw|muon]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mm15.base.training.optim import MuonAdamW, WarmupCosine
from mm15.base.tiny import TINY_WORDS, tiny_tokenizer

KINDS = ("Button", "Text field", "Icon", "Label")
SYSTEM = "Boxes [x1, y1, x2, y2], points [x, y] on a 1000x1000 canvas."


class Task:
    def __init__(self, name: str, vectors: tuple[torch.Tensor, torch.Tensor], tok, rng: random.Random):
        self.name, self.tok, self.rng = name, tok, rng
        self.kind_vec, self.row_vec = vectors  # the "vision": (4, hidden) each, shared by train and held-out
        prefix = tok.apply_chat_template([{"role": "system", "content": SYSTEM}], tokenize=False) + "<|im_start|>user\n"
        self.prefix_ids = torch.tensor(tok(prefix)["input_ids"])

    def sample(self, embed: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, labels) for one screen and one question; 16 image tokens, 4 per row."""
        kinds = [0, 1, 2, 3] if self.name == "text_only" else self.rng.sample(range(4), 4)
        row = 0 if self.name == "fixed_row" else self.rng.randrange(4)
        y = self.rng.randint(row * 250 + 40, row * 250 + 210)
        x = self.rng.randint(50, 950)
        where = f"in row {row + 1}" if self.name == "row_index" else f"[{x}, {y}]"
        question = f"\nWhat's the UI type of the widget {where}?<|im_end|>\n<|im_start|>assistant\n"
        answer = KINDS[kinds[row]] + "<|im_end|>"
        image = torch.stack([self.kind_vec[kinds[t // 4]] + self.row_vec[t // 4] for t in range(16)])
        q, a = (torch.tensor(self.tok(s)["input_ids"]) for s in (question, answer))
        emb = torch.cat([embed(self.prefix_ids), image, embed(torch.cat([q, a]))])
        labels = torch.full((emb.shape[0],), -100)
        labels[-len(a):] = a
        return emb, labels

    def batch(self, embed: torch.nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.sample(embed) for _ in range(n)]
        width = max(e.shape[0] for e, _ in items)
        emb = torch.stack([torch.cat([e, e.new_zeros(width - e.shape[0], e.shape[1])]) for e, _ in items])
        lab = torch.stack([torch.cat([lab, lab.new_full((width - lab.shape[0],), -100)]) for _, lab in items])
        return emb, lab


def first_token_accuracy(model: LlamaForCausalLM, emb: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(inputs_embeds=emb).logits
    first = (labels != -100).int().argmax(1)  # first answer token of each row
    rows = torch.arange(len(labels))
    return (logits[rows, first - 1].argmax(-1) == labels[rows, first]).float().mean().item()


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW (the demo's optimizer), or `MuonAdamW`: Muon on the decoder layers' matrices, AdamW on the
    embeddings and norms (the split `MM15Module.parameter_groups` makes)."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    named = list(model.named_parameters())
    matrix = [p.ndim == 2 and ".layers." in n for n, p in named]
    return MuonAdamW([{"params": [p for (_, p), m in zip(named, matrix) if m], "muon": True},
                      {"params": [p for (_, p), m in zip(named, matrix) if not m]}], lr=args.lr, weight_decay=0.0)


def run(name: str, layers: int, args: argparse.Namespace) -> tuple[int | None, float, float]:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = tiny_tokenizer(TINY_WORDS)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=1024, tie_word_embeddings=True,
        initializer_range=args.init))
    vectors = (torch.randn(4, args.hidden), args.row_scale * torch.randn(4, args.hidden))
    task = Task(name, vectors, tok, rng)
    held_out = Task(name, vectors, tok, random.Random(args.seed + 1))  # same "vision", other screens
    opt = make_optimizer(model, args)
    sched = WarmupCosine(opt, args.steps, warmup_ratio=0.05) if args.cosine else None  # the demo's schedule
    embed, learned, acc, start = model.get_input_embeddings(), None, 0.0, time.perf_counter()
    for step in range(1, args.steps + 1):
        emb, lab = task.batch(embed, args.batch)
        loss = model(inputs_embeds=emb, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        if sched is not None:
            sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                acc = first_token_accuracy(model, *held_out.batch(embed, 128))
            if learned is None and acc >= 0.5:
                learned = step
    return learned, acc, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3])
    p.add_argument("--tasks", nargs="+", default=["fixed_row", "text_only", "row_index", "referring"])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--init", type=float, default=0.02, help="LLM initializer_range (the UI demo: 0.1)")
    p.add_argument("--clip", type=float, default=0.0, help="gradient-norm clipping, 0: none (the UI demo: 1.0)")
    p.add_argument("--cosine", action="store_true", help="WarmupCosine with 5%% warmup, as the UI demo")
    p.add_argument("--row_scale", type=float, default=1.0,
                   help="scale of the row vector in the ideal image tokens; 0: position only through RoPE")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="muon: mm15.base.training.optim.MuonAdamW (Muon on the decoder layers' matrices, AdamW on the rest)")
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"{'task':10s} {'layers':>6s} {'steps to 2x chance':>19s} {'final acc':>9s} {'time s':>7s}")
    results = {}
    for layers in args.layers:
        for name in args.tasks:
            learned, acc, secs = run(name, layers, args)
            results[name, layers] = learned
            print(f"{name:10s} {layers:6d} {learned if learned else '> ' + str(args.steps):>19} {acc:9.3f} {secs:7.0f}", flush=True)
    for layers in args.layers:
        base = results.get(("fixed_row", layers))
        ref = results.get(("referring", layers))
        if base and ref:
            print(f"{layers} layers: referring needs {ref / base:.1f}x the steps of fixed_row")
        elif base:
            print(f"{layers} layers: referring needs > {args.steps / base:.1f}x the steps of fixed_row")


if __name__ == "__main__":
    main()
