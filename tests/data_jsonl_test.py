"""Users' JSONL: bad records reported, skipped and counted; good ones kept."""

import json
import logging

import numpy as np
from PIL import Image

from faithful_rl import data
from faithful_rl.data import jsonl


def write_dataset(tmp_path):
  img_dir = tmp_path / "img"
  img_dir.mkdir()
  Image.new("RGB", (100, 80), (200, 30, 30)).save(img_dir / "a.png")
  Image.new("RGB", (50, 40), (30, 30, 200)).save(img_dir / "b.png")
  (img_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
  ok = dict(images=["img/a.png"], question="How many?", answer="3")
  good = [
      dict(ok, id="g-plain"),
      dict(ok, id="g-box", boxes=[[10, 10, 50, 50]], box_labels=["red"]),
      # Normalized box on the second image (50 x 40): stored in pixels.
      dict(
          ok,
          id="g-norm",
          images=["img/a.png", "img/b.png"],
          boxes=[[0.1, 0.25, 0.5, 1.0]],
          box_image=1,
      ),
      dict(ok, id="g-clip", boxes=[[90, 70, 120, 100]]),  # partly outside
      dict(ok, id=17, answer=4, answer_type="number"),  # ints are fine
      dict(ok, id="g-abs", images=[str(img_dir / "b.png")]),
  ]
  bad = [  # (record, id, field, reason)
      (
          dict(ok, id="b-missing", images=["img/nope.png"]),
          "images[0]",
          "missing_image",
      ),
      (
          dict(ok, id="b-corrupt", images=["img/corrupt.png"]),
          "images[0]",
          "corrupt_image",
      ),
      (dict(ok, id="b-empty", answer="  "), "answer", "empty_answer"),
      (
          dict(ok, id="b-outside", boxes=[[150, 10, 200, 50]]),
          "boxes[0]",
          "box_outside",
      ),
      (dict(ok, id="b-zero", boxes=[[20, 10, 20, 50]]), "boxes[0]", "bad_box"),
      (
          dict(ok, id="b-inverted", boxes=[[10, 10, 50, 50], [40, 30, 20, 50]]),
          "boxes[1]",
          "bad_box",
      ),
      (dict(ok, id="b-type", question=7), "question", "wrong_type"),
      (dict(ok, id="b-images", images="img/a.png"), "images", "wrong_type"),
      (dict(ok, id="b-boxes", boxes=[[1, 2, 3]]), "boxes", "wrong_type"),
      (
          dict(ok, id="b-labels", boxes=[[1, 2, 3, 4]], box_labels=["a", "b"]),
          "box_labels",
          "bad_value",
      ),
      (dict(ok, id="b-boximg", box_image=3), "box_image", "bad_value"),
      (dict(ok, id="b-atype", answer_type="float"), "answer_type", "bad_value"),
      (dict(ok, id="g-plain"), "id", "duplicate_id"),
      (
          dict(images=["img/a.png"], id="b-noq", answer="1"),
          "question",
          "missing_field",
      ),
  ]
  lines = [json.dumps(r).encode() for r in good]
  for rec, _, _ in bad:
    lines.append(json.dumps(rec).encode())
  lines.append(
      b'{"id": "b-utf8", "images": ["img/a.png"], "question": "Q\xff?",'
      b' "answer": "1"}'
  )
  lines.append(b'{"id": "b-json", "images": ')
  path = tmp_path / "train.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n\n")
  expected_bad = [(r["id"], f, reason) for r, f, reason in bad]
  expected_bad += [
      ("b-utf8", "question", "non_utf8"),
      ("<line 22>", "<line>", "invalid_json"),
  ]
  good_ids = [str(r["id"]) for r in good]
  return str(path), good_ids, expected_bad


def test_bad_records_reported_one_line_each_and_counted(tmp_path, caplog):
  path, good_ids, expected_bad = write_dataset(tmp_path)
  with caplog.at_level(logging.WARNING, logger="faithful_rl.data.jsonl"):
    records, report = jsonl.read_jsonl(path)
  assert [r["id"] for r in records] == good_ids
  got = [(p.record_id, p.field, p.reason) for p in report.problems]
  assert got == expected_bad
  skip_lines = [m for m in caplog.messages if m.startswith("skipping")]
  assert len(skip_lines) == len(expected_bad)
  for line, (rid, field, _) in zip(skip_lines, expected_bad):
    assert "\n" not in line and repr(rid) in line and repr(field) in line
  assert report.counts == {
      "missing_image": 1,
      "corrupt_image": 1,
      "empty_answer": 1,
      "box_outside": 1,
      "bad_box": 2,
      "wrong_type": 3,
      "bad_value": 3,
      "duplicate_id": 1,
      "missing_field": 1,
      "non_utf8": 1,
      "invalid_json": 1,
  }
  assert report.num_good == 6 and report.num_bad == 16
  assert report.clipped_boxes == 1
  assert "6 records kept, 16 skipped" in report.summary()
  by_id = {r["id"]: r for r in records}
  np.testing.assert_array_equal(by_id["g-norm"]["boxes"], [[5, 10, 25, 40]])
  np.testing.assert_array_equal(by_id["g-clip"]["boxes"], [[90, 70, 100, 80]])
  assert by_id["17"]["answer"] == "4"
  assert by_id["g-plain"]["answer_type"] == "number"
  assert by_id["g-box"]["box_labels"] == ["red"]


def test_built_dataset_holds_every_good_record(tmp_path):
  path, good_ids, expected_bad = write_dataset(tmp_path)
  _, reports = data.build_jsonl(path, str(tmp_path / "tfds"), name="mine")
  assert reports["train"].num_bad == len(expected_bad)
  src = data.data_source("jsonl_vqa/mine", "train", str(tmp_path / "tfds"))
  assert len(src) == len(good_ids)
  rows = [src[i] for i in range(len(src))]
  assert [r["id"].decode() for r in rows] == good_ids
  norm = rows[2]
  assert len(norm["images"]) == 2 and norm["box_image"] == 1
  assert norm["images"][1] == (tmp_path / "img" / "b.png").read_bytes()
  np.testing.assert_array_equal(norm["boxes"], [[5, 10, 25, 40]])
  # The processor reads the built records: boxes refer to image 1.
  ex = data.processor_for(data.demo_tokenizer_dir())(norm)
  assert ex.has_boxes and ex.box_image == 1
  # Both images become 112 x 140 (4 x 5 tokens); the box is [0.5, 1, 2.5, 4]
  # in image 1's tokens: rows 1..3, columns 0..2, after image 0's 20 tokens.
  assert ex.num_visual_tokens == 40
  expect = {20 + r * 5 + c for r in (1, 2, 3) for c in (0, 1, 2)}
  assert set(np.flatnonzero(ex.evidence_mask)) == expect
