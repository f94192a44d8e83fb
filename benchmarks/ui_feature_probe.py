"""Does a trained UI model's vision side see each widget? A linear probe on its image tokens.

Referring in the UI demo can fail in two places: the vision tower and connector may not encode which
widget sits where, or the LLM may not look up the region that the question's coordinates name. This
probe takes the first out of the question. It draws fresh portrait screens (four rows, four distinct kinds),
encodes them with the checkpoint's vision tower and connector exactly as training does (processor
splitting, normalisation, `encode_media`), and fits one linear classifier per row: row r's widget
kind from the image tokens (all crops; the split crops only; the overview only). Held-out accuracy near
1.0 means the kinds are in the tokens at their places. Chance is 0.25.

Without `--ckpt` it probes the untrained model: the control, measured in the same way. Probe accuracy
near the control's in a run whose referring fails says the vision side sees each widget and the LLM's
lookup from the question's coordinates to the region is what fails (figures in docs/experiments.md).

    python benchmarks/ui_feature_probe.py --config configs/ui/demo.yaml --ckpt runs/ui_demo/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch
from pytorch_lightning import LightningDataModule

from mm15.base.training.checkpointing import frozen_parameter_names
from mm15.base.cli import MM15CLI
from mm15.base.module import MM15Module
from mm15.base.data.sample import Media, Sample, Turn
from mm15.data_builders.synthetic_ui import PLATFORMS, WIDGETS, ScreenSpec, make_screen


def image_tokens(module: MM15Module, screens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(screens, crops * tokens * d) image tokens, (screens, 4) kinds per row, tokens per crop x d."""
    rng, spec = random.Random(seed), ScreenSpec(landscape_ratio=0.0)
    feats, kinds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(screens):
            image, widgets = make_screen(rng, PLATFORMS[i % 2], spec)
            path = str(Path(tmp) / f"{i}.png")
            image.save(path)
            sample = Sample(f"probe{i}", [Turn("user", "<image>\n?"), Turn("assistant", "-")],
                            [Media(path=path, kind="image")], task="probe", source="probe")
            pixels = module.processor.normalize(module.processor(sample)["pixel_values"])  # as a training batch
            with torch.no_grad():
                tokens = module.model.encode_media(pixels)  # (crops, tokens per crop, d)
            feats.append(tokens.flatten())
            kinds.append([WIDGETS.index(w.kind) for w in widgets])
    return torch.stack(feats), torch.tensor(kinds), tokens.shape[1] * tokens.shape[2]


def probe(x: torch.Tensor, y: torch.Tensor, n_train: int, steps: int = 300) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised inputs, small L2)."""
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x[:n_train] @ w + b, y[:n_train]) + 1e-3 * (w**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ((x[n_train:] @ w + b).argmax(1) == y[n_train:]).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the run's config (builds the same model and processor)")
    p.add_argument("--ckpt", help="Lightning checkpoint of that run; without it, the untrained model (the control)")
    p.add_argument("--screens", type=int, default=1200)
    p.add_argument("--held_out", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=123)
    args = p.parse_args()
    torch.set_num_threads(1)
    cli = MM15CLI(MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  auto_configure_optimizers=False, run=False, args=["--config", args.config])
    module = cli.model
    module.configure_model()
    if args.ckpt:
        state = torch.load(args.ckpt, map_location="cpu", weights_only=False)["state_dict"]
        missing = set(module.load_state_dict(state, strict=False).missing_keys) - frozen_parameter_names(module)
        if missing:  # checkpoints leave frozen parameters out; anything else missing is another model
            raise SystemExit(f"{args.ckpt} does not match {args.config}: missing {sorted(missing)}")
    module.eval()
    x, y, per_crop = image_tokens(module, args.screens, args.seed)
    n_train = int(len(x) * (1 - args.held_out))
    crops = x.shape[1] // per_crop
    parts = {"all crops": slice(None), "split crops": slice(0, (crops - 1) * per_crop),
             "overview": slice((crops - 1) * per_crop, None)}
    print(f"{crops} crops per portrait screen; chance 0.25; {len(x) - n_train} held-out screens")
    for name, part in parts.items():
        accs = [probe(x[:, part], y[:, r], n_train) for r in range(y.shape[1])]
        print(f"{name:12s} row 1..{y.shape[1]} kind accuracy: " + "  ".join(f"{a:.2f}" for a in accs), flush=True)


if __name__ == "__main__":
    main()
