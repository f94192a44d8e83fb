"""Box/point text codec: Ferret convention, round trips, tolerant parsing, garbage never crashes."""

import random
import string

import pytest

from mm15.base.data.boxes import BoxCodec

IPHONE = (1170, 2532)


def test_encode_follows_ferret_truncation_and_clamping():
    codec = BoxCodec()
    assert codec.encode([10, 20, 110, 220], IPHONE) == "[8, 7, 94, 86]"
    # int(x * 1000 / W) truncates: 1169 px of 1170 -> 999.1 -> 999; the right edge clamps to 999.
    assert codec.encode([0, 0, 1170, 2532], IPHONE) == "[0, 0, 999, 999]"
    assert codec.encode([-5, -1, 5000, 9999], IPHONE) == "[0, 0, 999, 999]"
    assert codec.encode([585, 1266], IPHONE) == "[500, 500]"


def test_round_mode_and_small_canvas():
    codec = BoxCodec(canvas=100, rounding="round")
    assert codec.encode([0.96, 0, 1.0, 0.5], (2, 2)) == "[48, 0, 50, 25]"
    assert BoxCodec(canvas=100).encode([0.96, 0, 1.0, 0.5], (2, 2)) == "[48, 0, 50, 25]"
    assert BoxCodec(canvas=100).encode([0.999, 0, 0, 0], (2, 2)) == "[49, 0, 0, 0]"
    assert BoxCodec(canvas=100, rounding="round").encode([0.999, 0, 0, 0], (2, 2)) == "[50, 0, 0, 0]"


@pytest.mark.parametrize("size", [IPHONE, (1080, 1920), (48, 96), (7, 3)])
def test_box_round_trip_within_one_canvas_cell(size):
    codec, rng = BoxCodec(), random.Random(0)
    w, h = size
    for _ in range(200):
        x1, x2 = sorted(rng.uniform(0, w) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, h) for _ in range(2))
        (back,) = codec.decode_boxes(codec.encode([x1, y1, x2, y2], size), size)
        for got, want, extent in zip(back, [x1, y1, x2, y2], [w, h, w, h]):
            assert want - extent / 1000 - 1e-9 <= got <= want + 1e-9


def test_point_round_trip_and_encode_is_stable_after_decode():
    codec = BoxCodec()
    text = codec.encode([100.4, 2000.7], IPHONE)
    (point,) = codec.decode_points(text, IPHONE)
    assert codec.encode(point, IPHONE) == text
    assert codec.decode_boxes(text, IPHONE) == []


def test_referring_region_ratio_is_seeded_and_points_stay_inside():
    codec, box = BoxCodec(point_ratio=0.3), [100, 200, 300, 260]
    draws = [codec.referring_region(box, random.Random(seed)) for seed in range(2000)]
    points = [r for r in draws if len(r) == 2]
    assert 0.25 < len(points) / len(draws) < 0.35
    assert all(100 <= x <= 300 and 200 <= y <= 260 for x, y in points)
    # Near the centre: the middle half of the element holds most points (std 0.15 of the size).
    assert sum(150 <= x <= 250 and 215 <= y <= 245 for x, y in points) > 0.8 * len(points)
    assert draws[:50] == [codec.referring_region(box, random.Random(s)) for s in range(50)]
    assert BoxCodec(point_ratio=0.0).referring_region(box, random.Random(1)) == box
    assert len(BoxCodec(point_ratio=1.0).referring_region(box, random.Random(1))) == 2


@pytest.mark.parametrize("text, expected", [
    ("[8, 7, 94, 86]", [[8, 7, 94, 86]]),
    ("[8,7,94,86]", [[8, 7, 94, 86]]),
    ("  [ 8 ,  7 , 94 ,86 ]  ", [[8, 7, 94, 86]]),
    ("8, 7, 94, 86", [[8, 7, 94, 86]]),
    ("8 7 94 86", [[8, 7, 94, 86]]),
    ("(8, 7, 94, 86)", [[8, 7, 94, 86]]),
    ("Button [8, 7, 94, 86] and Text [10, 20, 30, 40].", [[8, 7, 94, 86], [10, 20, 30, 40]]),
    ("[8, 7, 94, 86][10, 20, 30, 40]", [[8, 7, 94, 86], [10, 20, 30, 40]]),
    ("[8, 7, 94, 86, 10, 20, 30, 40]", [[8, 7, 94, 86], [10, 20, 30, 40]]),
    ("[94, 86, 8, 7]", [[8, 7, 94, 86]]),  # inverted corners are sorted
    ("[8.5, 7, 94, 86]", [[8.5, 7, 94, 86]]),
    ("[-3, 7, 1200, 86]", [[0, 7, 999, 86]]),  # clamped to the canvas
    ("there are 3 buttons [8, 7, 94", []),  # truncated box: nothing
    ("[8, 7, 94]", []),
    ("no regions here", []),
    ("", []),
])
def test_tolerant_box_parsing(text, expected):
    # Image 1000 x 1000 so canvas values and pixels coincide.
    assert BoxCodec().decode_boxes(text, (1000, 1000)) == [[float(v) for v in b] for b in expected]


def test_points_and_boxes_in_reading_order():
    regions = BoxCodec().decode_regions("tap [5, 6] then [1, 2, 3, 4]", (1000, 1000))
    assert regions == [[5.0, 6.0], [1.0, 2.0, 3.0, 4.0]]


@pytest.mark.parametrize("text", [None, 123, b"[1,2,3,4]", "1e999 " * 20, "9" * 5000, "[" * 1000, "nan, inf, -inf, 1"])
def test_garbage_never_raises(text):
    out = BoxCodec().decode_boxes(text, IPHONE)
    assert isinstance(out, list)
    assert all(0 <= v <= max(IPHONE) for box in out for v in box)


def test_random_garbage_never_raises():
    rng = random.Random(0)
    alphabet = string.printable + "，；【】０１２"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        for region in BoxCodec().decode_regions(text, (48, 96)):
            assert len(region) in (2, 4)
    assert BoxCodec().decode_boxes("[1, 2, 3, 4]", (0, 10)) == []
    assert BoxCodec().decode_boxes("[1, 2, 3, 4]", None) == []


@pytest.mark.parametrize("region", [[1, 2, 3], [1, 2, 3, 4, 5], [], [1, float("nan")], ["a", 2]])
def test_encode_rejects_malformed_regions_with_a_clear_message(region):
    with pytest.raises(ValueError, match="region|coordinates"):
        BoxCodec().encode(region, IPHONE)


def test_encode_rejects_bad_image_size_and_codec_rejects_bad_config():
    with pytest.raises(ValueError, match="image_size"):
        BoxCodec().encode([1, 2, 3, 4], (0, 10))
    with pytest.raises(ValueError, match="point_ratio"):
        BoxCodec(point_ratio=1.5)


def test_prompt_states_the_convention():
    prompt = BoxCodec().prompt()
    assert "[x1, y1, x2, y2]" in prompt and "[x, y]" in prompt and "1000x1000" in prompt
    assert "100x100" in BoxCodec(canvas=100).prompt()
