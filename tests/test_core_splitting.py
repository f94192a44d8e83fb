"""Grid choice and crop layout of MM1.5 dynamic splitting on hand-worked sizes."""

import numpy as np
import pytest

from mm15.base.data.splitting import SplitSpec, candidate_grids, plan_split, select_grid, split_image


def test_training_grid_set_has_18_grids():
    grids = candidate_grids(4, 9)
    assert len(grids) == 18
    assert all(4 <= h * w <= 9 for h, w in grids)
    assert len(set(grids)) == 18


@pytest.mark.parametrize(
    "size, grid, resized",
    [
        ((1000, 1000), (2, 2), (1344, 1344)),  # square: 2x2 fits exactly, ties with 3x3 -> fewer crops
        ((10, 10), (2, 2), (1344, 1344)),  # tiny image is upscaled into the smallest zero-padding grid
        ((2016, 1344), (2, 3), (2016, 1344)),  # exactly 3 crops wide, 2 high
        ((1170, 2532), (4, 2), (1242, 2688)),  # phone portrait: only 4x2 holds it without downscaling
        ((2532, 1170), (2, 4), (2688, 1242)),
        ((1, 10000), (9, 1), (1, 6048)),  # extreme: least downscaling is the tallest grid
        ((10000, 1), (1, 9), (6048, 1)),
    ],
)
def test_grid_choice_hand_worked(size, grid, resized):
    plan = plan_split(*size, SplitSpec(crop_size=672, grid_min=4, grid_max=9))
    assert plan.grid == grid
    assert plan.resized == resized
    assert plan.num_crops == grid[0] * grid[1] + 1
    assert plan.crop_order[-1] == (0, 0)  # overview after the crops


def test_least_padding_wins_among_fitting_grids():
    # 600x300 fits every grid without downscaling; 1x2 and 2x4 leave no padding -> fewer crops (1x2)
    assert select_grid(600, 300, [(1, 2), (2, 4), (2, 2)], 336) == (1, 2)
    # 300x300 in 1x2 (pad half) vs 2x2 (no pad): least padding beats fewer crops
    assert select_grid(300, 300, [(1, 2), (2, 2)], 336) == (2, 2)


def test_least_downscaling_when_nothing_fits():
    # 4000x1000 at r=336 cannot fit any of these; 1x4 downscales least (scale 0.336)
    assert select_grid(4000, 1000, [(1, 2), (2, 2), (1, 4)], 336) == (1, 4)


def test_llava_next_rule_matches_ferret_ui_anyres():
    grids = [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]
    # 336x1000 portrait: 3x1 keeps full resolution (336*1000 effective) with least waste
    assert select_grid(336, 1000, grids, 336, rule="llava_next") == (3, 1)


def test_crops_row_major_then_overview_and_padding_colour():
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = 255  # left half white
    spec = SplitSpec(crop_size=20, grid_min=1, grid_max=4)
    crops, plan = split_image(img, spec)
    assert plan.grid == (1, 2) and plan.crop_order == [(1, 1), (1, 2), (0, 0)]
    assert crops[0].min() == 255 and crops[1].max() == 0
    overview = crops[2]  # 40x20 resized to 20x10, padded bottom with the mean colour
    assert tuple(overview[-1, 0]) == spec.pad_color and overview[0, 0].min() == 255


def test_static_none_and_overview_first():
    img = np.zeros((100, 300, 3), np.uint8)
    assert plan_split(300, 100, SplitSpec(crop_size=32, mode="static")).num_crops == 5
    crops, plan = split_image(img, SplitSpec(crop_size=32, mode="none"))
    assert len(crops) == 1 and crops[0].shape == (32, 32, 3) and not plan.has_grid
    plan = plan_split(300, 100, SplitSpec(crop_size=32, grid_min=1, grid_max=4, overview="first"))
    assert plan.crop_order[0] == (0, 0)


def test_split_false_gives_one_crop():
    crops, plan = split_image(np.zeros((64, 64, 3), np.uint8), SplitSpec(crop_size=32), split=False)
    assert len(crops) == 1 and plan.num_crops == 1
