"""verl / EasyR1 parquet: images as bytes or paths, bad records reported
as the JSONL reader reports them."""

import io
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from faithful_rl import data
from faithful_rl.data import formats
from faithful_rl.data import jsonl
from faithful_rl.data import parquet


def _png(size, colour) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, colour).save(buf, format="PNG")
  return buf.getvalue()


def _images(tmp_path):
  (tmp_path / "img").mkdir()
  a = _png((100, 80), (200, 30, 30))
  (tmp_path / "img" / "a.png").write_bytes(a)
  return a


def write_verl(tmp_path):
  a = _images(tmp_path)
  chat = lambda q: [
      {"role": "system", "content": "Think first."},
      {"role": "user", "content": f"<image>{q}"},
  ]
  truth = lambda x: {"ground_truth": x, "style": "rule"}
  rows = [
      # Bytes, as verl's preprocessing stores them.
      dict(prompt=chat("How many?"), reward_model=truth("3"),
           images=[{"bytes": a, "path": None}], extra_info={"index": 7}),
      # A path relative to the file, and boxes.
      dict(prompt=chat("Which colour?"), reward_model=truth("red"),
           images=[{"bytes": None, "path": "img/a.png"}],
           extra_info={"index": 8}, boxes=[[10.0, 10.0, 50.0, 50.0]]),
      # Bad: the image path does not exist.
      dict(prompt=chat("Q"), reward_model=truth("1"),
           images=[{"bytes": None, "path": "img/nope.png"}],
           extra_info={"index": 9}),
      # Bad: no ground truth.
      dict(prompt=chat("Q"), reward_model=truth(None),
           images=[{"bytes": a, "path": None}], extra_info={"index": 10}),
      # Bad: undecodable bytes.
      dict(prompt=chat("Q"), reward_model=truth("2"),
           images=[{"bytes": b"\x89PNG nope", "path": None}],
           extra_info={"index": 11}),
      # Bad: a box outside the 100 x 80 image.
      dict(prompt=chat("Q"), reward_model=truth("2"),
           images=[{"bytes": a, "path": None}], extra_info={"index": 12},
           boxes=[[150.0, 10.0, 200.0, 50.0]]),
  ]  # fmt: skip
  rows = [dict(dict(boxes=None), **r) for r in rows]  # one schema
  path = tmp_path / "verl.parquet"
  pq.write_table(pa.Table.from_pylist(rows), path)
  expected_bad = [
      ("9", "images[0]", "missing_image"),
      ("10", "reward_model.ground_truth", "missing_field"),
      ("11", "images[0]", "corrupt_image"),
      ("12", "boxes[0]", "box_outside"),
  ]
  return str(path), a, expected_bad


def write_easyr1(tmp_path, as_paths=False):
  """EasyR1's columns; images all bytes, or all paths (one column type)."""
  a = _images(tmp_path)
  image = "img/a.png" if as_paths else a
  rows = [
      dict(problem="<image>What is x?", answer="4", images=[image]),
      dict(problem="<image>Is it red?", answer="yes", images=[image]),
      dict(problem="<image>Q", answer="", images=[image]),  # empty answer
      dict(problem="<image>Q", answer="5", images=None),  # no image
  ]
  path = tmp_path / f"easyr1_{int(as_paths)}.parquet"
  pq.write_table(pa.Table.from_pylist(rows), path)
  expected_bad = [
      ("2", "answer", "empty_answer"),
      ("3", "images", "missing_field"),
  ]
  return str(path), a, expected_bad


def test_verl_layout_bytes_and_paths_and_bad_records(tmp_path, caplog):
  path, a, expected_bad = write_verl(tmp_path)
  report = jsonl.JsonlReport(path)
  with caplog.at_level(logging.WARNING, logger="faithful_rl.data.jsonl"):
    records = list(parquet.iter_parquet(path, report))
  assert [r["id"] for r in records] == ["7", "8"]
  assert [r["question"] for r in records] == ["How many?", "Which colour?"]
  assert [r["answer"] for r in records] == ["3", "red"]
  assert records[0]["images"] == [a] and records[1]["images"] == [a]
  np.testing.assert_array_equal(records[1]["boxes"], [[10, 10, 50, 50]])
  assert records[0]["boxes"].shape == (0, 4)
  got = [(p.record_id, p.field, p.reason) for p in report.problems]
  assert got == expected_bad
  assert [p.line for p in report.problems] == [3, 4, 5, 6]
  skip_lines = [m for m in caplog.messages if m.startswith("skipping")]
  assert len(skip_lines) == len(expected_bad)
  for line, (rid, field, _) in zip(skip_lines, expected_bad):
    assert "\n" not in line and repr(rid) in line and repr(field) in line
  assert report.counts == {
      "missing_image": 1, "missing_field": 1, "corrupt_image": 1,
      "box_outside": 1,
  }  # fmt: skip
  assert "2 records kept, 4 skipped" in report.summary()


@pytest.mark.parametrize("as_paths", [False, True])
def test_easyr1_layout_bytes_and_paths_and_bad_records(tmp_path, as_paths):
  path, a, expected_bad = write_easyr1(tmp_path, as_paths)
  report = jsonl.JsonlReport(path)
  records = list(formats.get("parquet")(path, report))
  assert [r["id"] for r in records] == ["0", "1"]
  assert [r["question"] for r in records] == ["What is x?", "Is it red?"]
  assert [r["answer_type"] for r in records] == ["number", "yes_no"]
  assert records[0]["images"] == [a] and records[1]["images"] == [a]
  got = [(p.record_id, p.field, p.reason) for p in report.problems]
  assert got == expected_bad
  assert report.num_good == 2 and report.num_bad == 2


def test_a_parquet_dataset_builds_as_jsonl_does(tmp_path):
  path, a, expected_bad = write_easyr1(tmp_path)
  tfds_dir = str(tmp_path / "tfds")
  _, reports = data.build_jsonl(
      {"train": path}, tfds_dir, name="er1", format="parquet"
  )
  assert reports["train"].num_bad == len(expected_bad)
  src = data.data_source("jsonl_vqa/er1", "train", tfds_dir)
  assert [src[i]["answer"].decode() for i in range(len(src))] == ["4", "yes"]
  assert src[1]["images"][0] == a


def test_unknown_format_and_missing_datasets_are_clear(tmp_path):
  with pytest.raises(KeyError, match="no dataset format named 'csv'.*jsonl"):
    data.build_jsonl({"train": "x.csv"}, str(tmp_path), format="csv")
  try:
    import datasets  # pylint: disable=unused-import
  except ImportError:
    with pytest.raises(ImportError, match="pip install datasets"):
      list(formats.get("hf")(str(tmp_path), None))
