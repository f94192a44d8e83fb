"""Contact sheets of test videos: `mm15 test` on the video module writes one PNG per sampled test
video, whose tiles are the frames the processor produced, and logs them to TensorBoard; the sample
is seeded and the crops of each video are found among the other media of a batch."""

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
import numpy as np

from required_imports import import_required

import_required("decord")  # fails where pyproject.toml requires decord

from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from mm15.base.data.datamodule import MM15DataModule, resolve_media  # noqa: E402
from mm15.base.data.media import MediaLayout  # noqa: E402
from mm15.base.data.splitting import SplitSpec  # noqa: E402
from mm15.base.module import GenerationSpec  # noqa: E402
from mm15.data_builders.synthetic_video import SyntheticVideoSource  # noqa: E402
from mm15.video.contact_sheets import MIN_TILE, FrameCapture, tile_boxes  # noqa: E402
from mm15.video.module import MM15VideoModule  # noqa: E402
from mm15.video.processor import VideoPreprocessSpec, VideoSpec  # noqa: E402
from mm15.video.sampling import FrameSampling  # noqa: E402

from conftest import tiny_spec  # noqa: E402

FRAMES, SIDE = 4, 32


def source(root) -> SyntheticVideoSource:
    return SyntheticVideoSource(str(root), split="test", num_samples=6, size=SIDE, num_frames=10)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    source(root).prepare()
    return root


def video_module(sheets: int) -> MM15VideoModule:
    torch.manual_seed(0)
    spec = VideoPreprocessSpec(split=SplitSpec(crop_size=SIDE, mode="none"), max_length=512,
                               video=VideoSpec(sampling=FrameSampling(FRAMES)))
    return MM15VideoModule(model=tiny_spec(), preprocessing=spec, contact_sheets=sheets,
                           generation=GenerationSpec(max_new_tokens=2))


def run_test(module, clips, root, logger=False) -> None:
    trainer = pl.Trainer(accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root))
    trainer.test(module, MM15DataModule(test=[source(clips)], batch_size=4), verbose=False)


def test_test_run_draws_sheets_of_the_frames_the_model_saw_and_logs_them(clips, tmp_path, capsys):
    module = video_module(sheets=4)
    run_test(module, clips, tmp_path, TensorBoardLogger(str(tmp_path), name="logs"))
    directory = tmp_path / "contact_sheets"
    assert f"4 contact sheets in {directory}" in capsys.readouterr().out
    paths = sorted(directory.glob("*.png"))
    assert len(paths) == 4 and len({p.name.split("_")[-1] for p in paths}) == 4  # four distinct videos

    # each sheet's tiles are its video's frames as the processor makes them, enlarged
    samples = {s.id: resolve_media(s, str(clips)) for s in source(clips).read()}
    scale, boxes = MIN_TILE // SIDE, tile_boxes(FRAMES, SIDE, SIDE)
    for path in paths:
        frames = module.processor(samples[path.stem.split("_")[-1]], generate=True)["pixel_values"]
        frames = frames.permute(0, 2, 3, 1).numpy()  # (4, 32, 32, 3)
        assert frames.std() > 10  # a shape on a background: the tiles cannot be blank
        sheet = np.asarray(Image.open(path).convert("RGB"))
        for frame, (left, top, right, bottom) in zip(frames, boxes):
            assert np.array_equal(sheet[top:bottom, left:right], frame.repeat(scale, 0).repeat(scale, 1)), path
        assert (sheet[boxes[0][3] + 14:] < 128).any()  # caption text under the tiles

    prompts = [v.prompt for v in module.frame_capture.items]
    assert all("Which colour is the shape most often?" in p and "<image>" not in p for p in prompts)
    events = EventAccumulator(str(tmp_path / "logs" / "version_0"))
    events.Reload()
    assert events.Tags()["images"] == [f"test/contact_sheets/{k:03d}" for k in range(4)]


def test_the_sample_is_seeded_and_zero_turns_sheets_off(clips, tmp_path, capsys):
    picked = []
    for run in ("a", "b"):
        module = video_module(sheets=3)
        run_test(module, clips, tmp_path / run)
        picked.append(sorted(v.id for v in module.frame_capture.items))
    assert picked[0] == picked[1] and len(set(picked[0])) == 3
    assert "3 contact sheets in" in capsys.readouterr().out
    run_test(video_module(sheets=0), clips, tmp_path / "off")
    assert not (tmp_path / "off" / "contact_sheets").exists() and "contact sheets" not in capsys.readouterr().out


def layout(kind: str, crops: int) -> MediaLayout:
    return MediaLayout(kind=kind, path=f"{kind}.mp4", crops=crops, placeholders=[1] * crops, source_size=(8, 8),
                       frame_indices=list(range(0, 2 * crops, 2)) if kind == "video" else [])


def test_capture_finds_each_videos_crops_among_images_and_keeps_at_most_the_limit():
    # sample a: an image of 2 crops then a 3-frame video; sample b: a 2-frame video. Crop c has value c.
    pixels = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 3, 2, 2).contiguous()
    batch = {"size": 2, "pixel_values": pixels, "ids": ["a", "b"], "tasks": ["qa", "qa"],
             "input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "layouts": [[layout("image", 2), layout("video", 3)], [layout("video", 2)]]}

    class Processor:
        image_token_id = 0
        tokenizer = type("Tokenizer", (), {"decode": staticmethod(lambda ids, **kw: "")})()

    capture = FrameCapture(limit=10)
    capture.add(batch, Processor())
    assert [(v.id, v.frames[:, 0, 0, 0].tolist(), v.frame_indices) for v in capture.items] == [
        ("a", [2, 3, 4], [0, 2, 4]), ("b", [5, 6], [0, 2])]
    small = FrameCapture(limit=2)
    for _ in range(50):
        small.add(batch, Processor())
    assert len(small.items) == 2 and small.seen == 100
