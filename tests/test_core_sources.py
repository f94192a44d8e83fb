"""The seam between builders and the data module: the one rows -> Sample | Skip loop, the one
conversation parser, and the cache rule of the generated (synthetic) splits."""

import json

import pytest

from mm15.base.data.sample import Sample, SampleError, Skip, Turn
from mm15.base.data.sources import build_once, read_json_records, samples_from_rows
from mm15.data_builders.ferret_ui import FerretUISource
from mm15.data_builders.llava import LlavaJsonSource, parse_conversation
from mm15.data_builders.synthetic_shapes import SyntheticShapesSource


def _to_sample(row, label):
    if row == "not a record":
        raise SampleError(label, "rows.json", "not a record at all")
    return Sample(str(row["id"]), [Turn("user", row["q"]), Turn("assistant", row["a"])] if row["a"] else [Turn("user", row["q"])])


def test_rows_become_samples_or_skips_naming_record_file_and_reason():
    rows = [("#0", {"id": "ok", "q": "hi", "a": "hello"}), Skip("line 3", "rows.json", "malformed JSON line"),
            ("#2", "not a record"), ("#3", {"id": "no_answer", "q": "hi", "a": ""}), ("#4", {"q": "no id"})]
    items = list(samples_from_rows(rows, "rows.json", _to_sample))
    assert isinstance(items[0], Sample) and items[0].id == "ok"
    skips = [(s.record_id, s.source, s.reason) for s in items[1:]]
    assert skips[0] == ("line 3", "rows.json", "malformed JSON line")
    assert skips[1] == ("#2", "rows.json", "not a record at all")
    assert skips[2][0] == "no_answer" and "no assistant turn" in skips[2][2]  # validated with the record's id
    assert skips[3] == ("#4", "rows.json", "malformed record (KeyError: 'id')")
    kept = list(samples_from_rows(rows[3:4], "rows.json", _to_sample, require_answer=False))
    assert isinstance(kept[0], Sample)


def test_json_array_and_jsonl_rows_are_labelled(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"x": 1}, {"x": 2}]))
    (tmp_path / "b.jsonl").write_text('{"x": 1}\n\n{broken\n')
    assert list(read_json_records(str(tmp_path / "a.json"))) == [("#0", {"x": 1}), ("#1", {"x": 2})]
    first, bad = read_json_records(str(tmp_path / "b.jsonl"))
    assert first == ("line 1", {"x": 1}) and isinstance(bad, Skip) and bad.record_id == "line 3"


def test_one_conversation_parser_for_llava_and_ferret_ui(tmp_path):
    from PIL import Image

    turns = parse_conversation({"conversations": [{"from": "human", "value": "Q"}, {"from": "GPT", "value": "A"}]},
                               lambda reason: SampleError("r", "f", reason), num_media=2)
    assert [(t.role, t.text) for t in turns] == [("user", "<image><image>\nQ"), ("assistant", "A")]
    bad = {"id": "r7", "image": "s.png", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]}
    Image.new("RGB", (8, 8)).save(tmp_path / "s.png")
    (tmp_path / "llava.json").write_text(json.dumps([bad]))
    (tmp_path / "ocr_train.json").write_text(json.dumps([dict(bad, id=7)]))
    (llava,) = LlavaJsonSource(str(tmp_path / "llava.json")).read()
    (ferret,) = FerretUISource(str(tmp_path / "ocr_train.json")).read()
    assert (llava.record_id, ferret.record_id) == ("r7", "7") and llava.reason == ferret.reason
    assert llava.reason == "turn 0: expected {'from': 'human'|'gpt'|'system', 'value': str}, got unknown role 'robot'"


def test_build_once_rebuilds_only_when_a_parameter_changes(tmp_path):
    built = []
    assert build_once(tmp_path, "train", {"n": 2, "grid": (1, 2)}, lambda: built.append(1))
    assert not build_once(tmp_path, "train", {"n": 2, "grid": (1, 2)}, lambda: built.append(2))  # tuples read back as lists
    assert build_once(tmp_path, "train", {"n": 3, "grid": (1, 2)}, lambda: built.append(3))
    assert built == [1, 3] and json.loads((tmp_path / "train.params.json").read_text()) == {"n": 3, "grid": [1, 2]}

    def fails():
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        build_once(tmp_path, "train", {"n": 4}, fails)
    assert not (tmp_path / "train.params.json").exists()  # a half-built split is not reused
    assert build_once(tmp_path, "train", {"n": 3, "grid": (1, 2)}, lambda: built.append(4))


def test_shapes_split_is_regenerated_when_num_samples_changes(tmp_path):
    def read(n):
        return list(SyntheticShapesSource(str(tmp_path), split="val", num_samples=n, min_side=40, max_side=60).read())

    assert len(read(3)) == 3
    first = (tmp_path / "val.jsonl").stat().st_mtime_ns
    assert len(read(3)) == 3 and (tmp_path / "val.jsonl").stat().st_mtime_ns == first  # reused
    assert len(read(5)) == 5  # a changed parameter regenerates, never the old 3
    assert json.loads((tmp_path / "val.params.json").read_text())["num_samples"] == 5


def test_a_malformed_json_array_is_a_start_up_error_naming_file_line_and_column(tmp_path):
    from mm15.base.data.datamodule import MM15DataModule
    from mm15.base.data.sources import DataFileError

    path = tmp_path / "llava_500k.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b",, "conversations": []}\n]\n')
    with pytest.raises(DataFileError, match=r"llava_500k.json: not valid JSON: .* at line 3, column 14"):
        list(read_json_records(str(path)))
    dm = MM15DataModule(train=[LlavaJsonSource(str(path))], max_error_fraction=1.0)
    with pytest.raises(DataFileError, match="llava_500k.json"):  # not one budgeted skip for the whole file
        dm.read_split("train")


def test_a_relative_media_root_follows_the_working_directory(tmp_path, monkeypatch):
    from mm15.base.data.sources import resolve_media_path

    for name in ("a", "b"):
        (tmp_path / name / "data").mkdir(parents=True)
        monkeypatch.chdir(tmp_path / name)
        assert resolve_media_path("x.png", "data") == str((tmp_path / name / "data" / "x.png").resolve())
