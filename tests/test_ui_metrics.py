"""UI metrics against hand-computed values: IoU, grounding, exact match, CIDEr-D, F1, categories."""

import builtins
import math
import random

import pytest

from mm15.base.data.boxes import BoxCodec
from mm15.base.data.media import MediaLayout
from mm15.base.metrics import format_table
from mm15.ui import metrics as M


def test_iou_by_hand():
    assert M.box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert M.box_iou([0, 0, 10, 10], [0, 0, 10, 5]) == pytest.approx(0.5)
    assert M.box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges
    assert M.box_iou([0, 0, 0, 10], [0, 0, 0, 10]) == 0.0  # degenerate


def test_grounding_score_threshold_is_strict_and_uses_the_first_box():
    true = [[0, 0, 10, 10]]
    assert M.grounding_score([[0, 0, 10, 5]], true) == 0.0  # IoU exactly 0.5 is not > 0.5
    assert M.grounding_score([[0, 0, 10, 6]], true) == 1.0
    assert M.grounding_score([[50, 50, 60, 60], [0, 0, 10, 10]], true) == 0.0
    assert M.grounding_score([], true) == 0.0


def test_grounding_score_several_boxes():
    true = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]
    assert M.grounding_score([[20, 0, 30, 10], [0, 0, 10, 10]], true) == pytest.approx(2 / 3)
    predicted = true + [[60, 0, 70, 10]]  # one extra box costs
    assert M.grounding_score(predicted, true) == pytest.approx(3 / 4)
    # One prediction cannot match two true boxes.
    assert M.grounding_score([[0, 0, 10, 10]], [[0, 0, 10, 10], [0, 0, 10, 10]]) == pytest.approx(1 / 2)


def test_tap_label_and_f1_by_hand():
    assert [M.tap_label(t) for t in ["Yes, it is tappable.", "This element is not tappable", "No", "untappable",
                                     "tappable", "maybe", ""]] == [True, False, False, False, True, None, None]
    # tp = 1, fp = 1, fn = 2 -> F1 = 2 / (2 + 1 + 2)
    assert M.binary_f1([True, True, False, None], [True, False, True, True]) == pytest.approx(0.4)
    assert M.binary_f1([False, False], [False, False]) == 0.0


LOG2 = math.log(2)


@pytest.mark.parametrize("cands, refs, expected", [
    # Two items, every n-gram in one item only: idf = log 2 everywhere. A perfect 2-word caption
    # matches unigrams and bigrams (cosine 1) and has no 3/4-grams: 10 * (1 + 1 + 0 + 0) / 4 = 5.
    (["a b", "c d"], [["a b"], ["c d"]], 5.0),
    # "a c" vs "a b": unigram cosine log2^2 / (sqrt2 log2)^2 = 0.5, no bigram: 10 * 0.5 / 4 = 1.25.
    (["a c", "c d"], [["a b"], ["c d"]], (1.25 + 5.0) / 2),
    # Clipping: "a a" has tf-idf 2 log2 for "a", clipped to the reference's log2:
    # log2^2 / (2 log2 * sqrt2 log2) = 1 / (2 sqrt2); 10 * that / 4.
    (["a a", "c d"], [["a b"], ["c d"]], (10 / 4 / (2 * math.sqrt(2)) + 5.0) / 2),
    # Length penalty: "a b c" has 2 bigrams, the reference 1 -> exp(-1 / 72);
    # unigram cosine 2 / sqrt6, bigram cosine 1 / sqrt2.
    (["a b c", "c d"], [["a b"], ["c d"]], (2.5 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) * math.exp(-1 / 72) + 5.0) / 2),
    # Two references: the item's score is the mean over them (5 for the match, 0 for "x y").
    (["a b", "c d"], [["a b", "x y"], ["c d"]], (2.5 + 5.0) / 2),
])
def test_cider_d_against_hand_computed_values(cands, refs, expected):
    assert M._cider_d(cands, refs) == pytest.approx(expected, rel=1e-9)
    assert M.cider_d(cands, refs) == pytest.approx(expected, rel=1e-9)


def test_cider_d_tokenises_and_handles_empty_input():
    assert M.cider_d(["A, B!", "c  D"], [["a b"], ["C d."]]) == pytest.approx(5.0)
    assert M.cider_d([], []) == 0.0
    assert M.cider_d(["x"], [[""]]) == 0.0


def test_cider_d_fallback_when_pycocoevalcap_is_absent(monkeypatch):
    real_import = builtins.__import__

    def no_coco(name, *args, **kwargs):
        if name.startswith("pycocoevalcap"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_coco)
    assert M.cider_d(["a c", "c d"], [["a b"], ["c d"]]) == pytest.approx(3.125)


def test_our_cider_d_matches_pycocoevalcap():
    scorer_module = pytest.importorskip("pycocoevalcap.cider.cider_scorer")
    rng = random.Random(0)
    vocab = "home settings back button search list item open close menu profile".split()
    sentence = lambda: " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 9)))  # noqa: E731
    cands = [sentence() for _ in range(30)]
    refs = [[sentence() for _ in range(rng.randint(1, 3))] for _ in range(30)]
    scorer = scorer_module.CiderScorer(n=4, sigma=6.0)
    for c, rs in zip(cands, refs):
        scorer += (c, rs)
    assert M._cider_d(cands, refs) == pytest.approx(float(scorer.compute_score()[0]), rel=1e-9)


def record(task, platform, prediction, answer, boxes=None, size=(1000, 1000)):
    return {"id": f"{task}:{prediction}", "task": task, "prediction": prediction, "answer": answer,
            "media": [MediaLayout("image", "screen.png", 1, [4], size).to_dict()],
            "meta": {"platform": platform, "answer_boxes": boxes or []}}


def test_results_rows_and_category_averages_by_hand():
    codec = BoxCodec()
    records = [
        # iPhone OCR: 2 of 3 right (normalised), 3 distinct answers -> chance 1/3.
        record("ocr", "iphone", "Settings.", "settings"), record("ocr", "iphone", "home", "Home"),
        record("ocr", "iphone", "back", "Search"),
        # iPhone widget classification: 1 of 2, 2 distinct answers -> chance 1/2.
        record("widget_classification", "iphone", "Button", "button"),
        record("widget_classification", "iphone", "Button", "text field"),
        # iPhone find_text: first right (IoU 0.81), second wrong. Image 1000 px: canvas = pixels.
        record("find_text", "iphone", "[0, 0, 100, 100]", "<bbox_location0>", [[0, 0, 90, 90]]),
        record("find_text", "iphone", "at 500 500 600 600", "<bbox_location0>", [[0, 0, 100, 100]]),
        # Android find_widget: right.
        record("find_widget", "android", "[10, 10, 50, 50]", "<bbox_location0>", [[10, 10, 50, 50]]),
        record("taperception", "android", "Yes, tappable", "Yes, the element is tappable"),
        record("function", "android", "anything", "a description"),
    ]
    rows = {r["task"]: r for r in M.ui_results(records, codec)}
    assert rows["iphone/ocr"]["score"] == pytest.approx(2 / 3) and rows["iphone/ocr"]["baseline"] == pytest.approx(1 / 3)
    assert rows["iphone/widget_classification"]["score"] == pytest.approx(0.5)
    assert rows["iphone/find_text"]["score"] == pytest.approx(0.5) and rows["iphone/find_text"]["metric"] == "iou>0.5"
    # Average true box [0, 0, 95, 95]: IoU with [0,0,90,90] = 8100/9025 > .5, with [0,0,100,100] = .9025.
    assert rows["iphone/find_text"]["baseline"] == pytest.approx(1.0)
    assert rows["android/taperception"]["score"] == pytest.approx(1.0)
    assert rows["android/function"]["metric"] == "unscored" and rows["android/function"]["score"] is None
    assert rows["Ref-i"]["score"] == pytest.approx((2 / 3 + 0.5) / 2) and rows["Ref-i"]["n"] == 5
    assert rows["Ref-i"]["baseline"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert rows["Grd-i"]["score"] == pytest.approx(0.5) and rows["Grd-A"]["score"] == pytest.approx(1.0)
    assert "Ref-A" not in rows  # no Android referring data
    table = format_table(list(rows.values()), M.RESULT_COLUMNS)
    assert "Grd-i" in table and "iphone/find_text" in table


def test_on_screen_baseline_is_naming_a_random_candidate_on_the_screen():
    # Two OCR records: two words on the first screen, four (one repeated up to case) on the second.
    first = record("ocr", "iphone", "Back", "Back")
    first["meta"]["on_screen_answers"] = ["Back", "OK"]
    second = record("ocr", "iphone", "OK", "Add")
    second["meta"]["on_screen_answers"] = ["Add", "add", "OK", "Cancel"]
    wc = record("widget_classification", "iphone", "Icon", "Icon")  # no on-screen list: no baseline
    rows = {r["task"]: r for r in M.ui_results([first, second, wc], BoxCodec())}
    assert rows["iphone/ocr"]["on_screen"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert rows["iphone/ocr"]["baseline"] == pytest.approx(1 / 2)  # chance: two distinct answers
    assert rows["iphone/widget_classification"]["on_screen"] is None
    assert rows["Ref-i"]["on_screen"] is None  # not every task of the category has one
    ocr_only = {r["task"]: r for r in M.ui_results([first, second], BoxCodec())}
    assert ocr_only["Ref-i"]["on_screen"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_grounding_on_screen_baseline_is_answering_with_a_random_element_box():
    # Screen 1: the asked-for box [0,0,100,100] among 4 boxes; [0,0,100,90] also matches (IoU 0.9),
    # the other two do not -> 2/4. Screen 2: the true box is the only close one of 2 -> 1/2.
    first = record("find_text", "iphone", "[0, 0, 100, 100]", "<bbox_location0>", [[0, 0, 100, 100]])
    first["meta"]["on_screen_boxes"] = [[0, 0, 100, 100], [0, 0, 100, 90], [0, 500, 100, 600], [0, 0, 300, 300]]
    second = record("find_text", "iphone", "[0, 0, 10, 10]", "<bbox_location0>", [[200, 200, 400, 400]])
    second["meta"]["on_screen_boxes"] = [[200, 200, 400, 400], [600, 600, 800, 800]]
    widget = record("find_widget", "iphone", "[0, 0, 10, 10]", "<bbox_location0>", [[0, 0, 10, 10]])
    rows = {r["task"]: r for r in M.ui_results([first, second, widget], BoxCodec())}
    assert rows["iphone/find_text"]["score"] == pytest.approx(1 / 2)
    assert rows["iphone/find_text"]["on_screen"] == pytest.approx((2 / 4 + 1 / 2) / 2)
    assert rows["iphone/find_widget"]["on_screen"] is None and rows["Grd-i"]["on_screen"] is None
    widget["meta"]["on_screen_boxes"] = [[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]]  # 2 of 3
    rows = {r["task"]: r for r in M.ui_results([first, second, widget], BoxCodec())}
    assert rows["Grd-i"]["on_screen"] == pytest.approx(((2 / 4 + 1 / 2) / 2 + 2 / 3) / 2)
    listing = record("widget_listing", "iphone", "", "", [[0, 0, 10, 10], [20, 20, 30, 30]])
    listing["meta"]["on_screen_boxes"] = [[0, 0, 10, 10]]
    assert M.ui_results([listing], BoxCodec())[0]["on_screen"] is None  # several true boxes: not defined


def test_grounding_decodes_in_the_original_frame_of_each_record():
    codec = BoxCodec()
    size = (1170, 2532)
    true = [[445, 524, 692, 632]]
    text = codec.encode(true[0], size)
    rec = record("find_widget", "iphone", text, "<bbox_location0>", true, size)
    assert M.score_grounding([rec], codec)[0] == 1.0
    assert M.score_grounding([dict(rec, prediction="garbage ]][[")], codec)[0] == 0.0


def test_boxes_decode_in_the_screenshot_size_from_the_record_media():
    codec = BoxCodec()
    tall = (500, 2000)
    prediction = codec.encode([100, 400, 200, 800], tall)  # on the 1000 x 1000 canvas
    rows = {r["task"]: r for r in M.ui_results(
        [record("find_text", "iphone", prediction, "<bbox_location0>", [[100, 400, 200, 800]], size=tall)], codec)}
    assert prediction != "[100, 400, 200, 800]" and rows["iphone/find_text"]["score"] == 1.0
