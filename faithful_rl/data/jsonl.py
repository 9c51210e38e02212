"""Users' own evidence-VQA data as JSONL: validation and reading.

One record per line:
  {"id": "q1", "images": ["img/a.png", ...], "question": "...",
   "answer": "3", "answer_type": "number",          # optional
   "boxes": [[x0, y0, x1, y1], ...],                 # optional
   "box_labels": ["the red cube", ...],              # optional
   "box_image": 0,                                   # optional, default 0
   "reference_response": "... \\boxed{3}"}          # optional
Image paths are relative to the JSONL file (absolute paths also work).
Boxes are pixels of image `box_image`, or normalized when every coordinate
lies in [0, 1]; they are stored in pixels.

Bad records are skipped, each reported on one line naming the record id
and the field, and counted per reason: invalid JSON, non-UTF-8 text, a
missing field, a field of the wrong type, an empty answer, a missing or
undecodable image, a zero-area/inverted/non-finite box, a box wholly
outside its image. A box partly outside its image is clipped and counted;
the record is kept. Answers given as JSON numbers are turned into strings;
`answer_type` defaults to `processing.infer_answer_type(answer)`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import math
import os
from typing import Any, Iterator

import numpy as np
from PIL import Image

from faithful_rl.data import processing
from faithful_rl.data import targets as targets_lib

ANSWER_TYPES = ("number", "choice", "yes_no", "text")

# Reasons a record is skipped (the keys of `JsonlReport.counts`).
REASONS = (
    "invalid_json",
    "non_utf8",
    "missing_field",
    "wrong_type",
    "bad_value",
    "duplicate_id",
    "empty_answer",
    "missing_image",
    "corrupt_image",
    "bad_box",
    "box_outside",
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Problem:
  """Why one record was skipped."""

  path: str
  line: int
  record_id: str
  field: str
  reason: str  # one of REASONS
  detail: str

  def __str__(self) -> str:
    return (
        f"{self.path}:{self.line}: record {self.record_id!r}: field"
        f" {self.field!r}: {self.reason}: {self.detail}"
    )


@dataclasses.dataclass
class JsonlReport:
  """What reading one JSONL file found."""

  path: str
  num_lines: int = 0
  num_good: int = 0
  clipped_boxes: int = 0
  problems: list[Problem] = dataclasses.field(default_factory=list)

  @property
  def counts(self) -> dict[str, int]:
    """Skipped records per reason."""
    return dict(collections.Counter(p.reason for p in self.problems))

  @property
  def num_bad(self) -> int:
    return len(self.problems)

  def summary(self) -> str:
    counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
    return (
        f"{self.path}: {self.num_good} records kept, {self.num_bad} skipped"
        f" ({counts or 'none'}), {self.clipped_boxes} boxes clipped"
    )


class BadRecord(Exception):
  """Raised by a format's reader: the record is skipped, naming `field`
  (and the record's id, when the reader knew it before the record failed)."""

  def __init__(self, field: str, reason: str, detail: str, record_id=None):
    super().__init__(detail)
    self.field, self.reason, self.detail = field, reason, detail
    self.record_id = record_id


def _has_surrogates(s: str) -> bool:
  try:
    s.encode("utf-8")
    return False
  except UnicodeEncodeError:
    return True


def _non_utf8_field(obj, prefix: str = "") -> str | None:
  """The first field (dotted path) holding text that is not valid UTF-8."""
  if isinstance(obj, str):
    return prefix if _has_surrogates(obj) else None
  if isinstance(obj, dict):
    for k, v in obj.items():
      name = f"{prefix}.{k}" if prefix else str(k)
      if isinstance(k, str) and _has_surrogates(k):
        return name
      found = _non_utf8_field(v, name)
      if found is not None:
        return found
  if isinstance(obj, list):
    for i, v in enumerate(obj):
      found = _non_utf8_field(v, f"{prefix}[{i}]")
      if found is not None:
        return found
  return None


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _read_image(base_dir: str, item, field: str) -> tuple[bytes, tuple]:
  """An image given as a path (relative to `base_dir`), encoded bytes, or a
  {"bytes", "path"} dict (the HF `datasets` Image layout): its bytes and
  (height, width)."""
  if isinstance(item, dict):
    if item.get("bytes"):
      item = item["bytes"]
    elif item.get("path"):
      item = item["path"]
    else:
      raise BadRecord(field, "missing_image", "neither bytes nor a path")
  if isinstance(item, (bytes, bytearray)):
    data, where = bytes(item), f"{len(item)} bytes"
  elif isinstance(item, str) and item:
    full = item if os.path.isabs(item) else os.path.join(base_dir, item)
    if not os.path.isfile(full):
      raise BadRecord(field, "missing_image", f"{full} does not exist")
    with open(full, "rb") as f:
      data, where = f.read(), full
  else:
    raise BadRecord(
        field, "wrong_type", f"expected a path string, got {item!r}"
    )
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Exception as e:  # pylint: disable=broad-except
    raise BadRecord(field, "corrupt_image", f"{where} cannot be decoded: {e}")
  return data, (img.height, img.width)


def _text_field(rec, name: str, *, required: bool) -> str | None:
  if name not in rec or rec[name] is None:
    if required:
      raise BadRecord(name, "missing_field", "required")
    return None
  if not isinstance(rec[name], str):
    raise BadRecord(
        name, "wrong_type", f"expected a string, got {type(rec[name]).__name__}"
    )
  return rec[name]


def validate_record(rec: Any, base_dir: str) -> tuple[dict[str, Any], int]:
  """Checks one parsed record; returns the stored record and boxes clipped.

  Raises:
    BadRecord: naming the field and reason.
  """
  if not isinstance(rec, dict):
    raise BadRecord("<record>", "wrong_type", "a line must hold a JSON object")
  question = _text_field(rec, "question", required=True)
  if not question.strip():
    raise BadRecord("question", "bad_value", "empty question")
  if "answer" not in rec or rec["answer"] is None:
    raise BadRecord("answer", "missing_field", "required")
  answer = rec["answer"]
  if _is_number(answer):
    answer = str(answer)
  if not isinstance(answer, str):
    raise BadRecord(
        "answer",
        "wrong_type",
        f"expected a string or number, got {type(answer).__name__}",
    )
  if not answer.strip():
    raise BadRecord("answer", "empty_answer", "the answer is empty")
  answer_type = _text_field(rec, "answer_type", required=False)
  if answer_type is None:
    answer_type = processing.infer_answer_type(answer)
  elif answer_type not in ANSWER_TYPES:
    raise BadRecord(
        "answer_type", "bad_value", f"{answer_type!r} not in {ANSWER_TYPES}"
    )
  reference = _text_field(rec, "reference_response", required=False) or ""
  family = _text_field(rec, "family", required=False) or ""

  images = rec.get("images")
  if images is None:
    raise BadRecord("images", "missing_field", "required")
  if not isinstance(images, list) or not images:
    raise BadRecord(
        "images", "wrong_type", "expected a non-empty list of paths"
    )
  blobs, sizes = [], []
  for i, path in enumerate(images):
    data, size = _read_image(base_dir, path, f"images[{i}]")
    blobs.append(data)
    sizes.append(size)

  box_image = rec.get("box_image", 0)
  if not _is_int(box_image):
    raise BadRecord(
        "box_image", "wrong_type", f"expected an int, got {box_image!r}"
    )
  if not 0 <= box_image < len(images):
    raise BadRecord(
        "box_image", "bad_value", f"{box_image} but {len(images)} images"
    )

  raw_boxes = rec.get("boxes") or []
  if not isinstance(raw_boxes, list) or not all(
      isinstance(b, list) and len(b) == 4 and all(_is_number(v) for v in b)
      for b in raw_boxes
  ):
    raise BadRecord(
        "boxes", "wrong_type", "expected a list of [x0, y0, x1, y1]"
    )
  boxes = np.asarray(raw_boxes, np.float64).reshape(-1, 4)
  h, w = sizes[box_image]
  if targets_lib.is_normalized(boxes):
    boxes = boxes * np.array([w, h, w, h], np.float64)
  for i, b in enumerate(boxes):
    x0, y0, x1, y1 = b
    if not all(math.isfinite(v) for v in b):
      raise BadRecord(f"boxes[{i}]", "bad_box", f"{b.tolist()} is not finite")
    if x1 <= x0 or y1 <= y0:
      kind = "zero-area" if x1 == x0 or y1 == y0 else "inverted"
      raise BadRecord(f"boxes[{i}]", "bad_box", f"{b.tolist()} is {kind}")
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
      raise BadRecord(
          f"boxes[{i}]",
          "box_outside",
          f"{b.tolist()} lies outside the {w}x{h} image",
      )
  boxes, clipped = targets_lib.clip_boxes(boxes, w, h)

  labels = rec.get("box_labels")
  if labels is None:
    labels = [""] * len(boxes)
  if not isinstance(labels, list) or not all(
      isinstance(s, str) for s in labels
  ):
    raise BadRecord("box_labels", "wrong_type", "expected a list of strings")
  if len(labels) != len(boxes):
    raise BadRecord(
        "box_labels",
        "bad_value",
        f"{len(labels)} labels for {len(boxes)} boxes",
    )
  out = {
      "images": blobs,
      "question": question,
      "answer": answer,
      "answer_type": answer_type,
      "boxes": boxes.astype(np.float32),
      "box_labels": labels,
      "box_image": box_image,
      "reference_response": reference,
      "family": family,
  }
  return out, clipped


def _record_id(rec) -> str | None:
  if isinstance(rec, dict):
    rid = rec.get("id")
    if isinstance(rid, str) and not _has_surrogates(rid):
      return rid
    if _is_int(rid):
      return str(rid)
  return None


def check_records(
    report: JsonlReport, entries: Iterator[tuple[int, Any]], base_dir: str
) -> Iterator[dict[str, Any]]:
  """Yields the good records of `entries`, filling `report`.

  The reading and reporting every format shares: `entries` yields (line,
  read) pairs, `read()` returning one raw record in this module's layout,
  or (record, False) when its text was not valid UTF-8, or raising `BadRecord`.
  Every skipped record is logged (one warning line: file, line, record id,
  field, reason) and appended to `report.problems`; the summary is logged
  at the end.
  """
  seen = set()
  for line_no, read in entries:
    report.num_lines += 1
    rid = f"<line {line_no}>"
    try:
      rec, strict = read(), True
      if isinstance(rec, tuple):
        rec, strict = rec
      rid = _record_id(rec) or rid
      bad_field = _non_utf8_field(rec)
      if bad_field is not None or not strict:
        raise BadRecord(bad_field or "<line>", "non_utf8", "text is not UTF-8")
      if "id" not in rec:
        raise BadRecord("id", "missing_field", "required")
      if _record_id(rec) is None:
        raise BadRecord("id", "wrong_type", "expected a string or int")
      if rid in seen:
        raise BadRecord("id", "duplicate_id", "seen on an earlier line")
      good, clipped = validate_record(rec, base_dir)
    except BadRecord as bad:
      rid = rid if bad.record_id is None else str(bad.record_id)
      problem = Problem(
          report.path, line_no, rid, bad.field, bad.reason, bad.detail
      )
      report.problems.append(problem)
      log.warning("skipping %s", problem)
      continue
    seen.add(rid)
    report.clipped_boxes += clipped
    report.num_good += 1
    good["id"] = rid
    yield good
  log.warning("%s", report.summary())


def _json_line(raw: bytes):
  """One JSONL line's record, and whether its bytes were valid UTF-8."""
  try:
    line, strict = raw.decode("utf-8"), True
  except UnicodeDecodeError:
    line, strict = raw.decode("utf-8", errors="surrogateescape"), False
  try:
    return json.loads(line), strict
  except json.JSONDecodeError as e:
    raise BadRecord("<line>", "invalid_json", str(e)) from None


def iter_jsonl(
    path: str, report: JsonlReport | None = None
) -> Iterator[dict[str, Any]]:
  """Yields the good records of a JSONL file, filling `report`
  (`check_records`)."""
  report = report if report is not None else JsonlReport(path)
  base_dir = os.path.dirname(os.path.abspath(path))
  with open(path, "rb") as f:
    entries = (
        (line_no, lambda raw=raw: _json_line(raw))
        for line_no, raw in enumerate(f, start=1)
        if raw.strip()
    )
    yield from check_records(report, entries, base_dir)


def read_jsonl(path: str) -> tuple[list[dict[str, Any]], JsonlReport]:
  """All good records of a JSONL file (in memory) and the report."""
  report = JsonlReport(path)
  records = list(iter_jsonl(path, report))
  return records, report
