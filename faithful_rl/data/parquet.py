"""verl / EasyR1 data: parquet files and HF `datasets` folders.

`data.format=parquet` reads a parquet file, `data.format=hf` a folder that
`datasets.Dataset.save_to_disk` wrote (`pip install datasets`). Each row is
one record, in one of three layouts, told apart by their columns:

  verl     prompt: a chat [{"role", "content"}, ...] (the user turns' text
           is the question) or a string; reward_model.ground_truth: the
           answer; extra_info.index: the id (optional)
  EasyR1   problem: the question; answer: the answer
  ours     question, answer (as `faithful_rl.data.jsonl`)

Every layout may hold `id` (default: the row's index), `images` (a list;
each encoded bytes, a path relative to the file, or a {"bytes", "path"}
struct as HF `datasets` stores images), and optionally `answer_type`,
`boxes`, `box_labels`, `box_image` and `reference_response` as in JSONL.
`<image>` placeholders are removed from the question (the processor places
the images). Bad records are skipped, reported and counted as the JSONL
reader does (`jsonl.check_records`), with the row (from 1) as the line.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

from faithful_rl.data import formats
from faithful_rl.data import jsonl
from faithful_rl.data.jsonl import BadRecord

_PLACEHOLDER = re.compile(r"\s*<image>\s*")
# Columns of our layout that pass through as they are.
_OPTIONAL = ("answer_type", "boxes", "box_labels", "box_image",
             "reference_response", "family")  # fmt: skip


def _text(content, field: str) -> str:
  """A chat turn's content (a string or [{"type": "text", "text"}, ...])."""
  if isinstance(content, str):
    return content
  if isinstance(content, list):
    parts = [p.get("text") or "" for p in content if isinstance(p, dict)]
    return "\n".join(p for p in parts if p)
  raise BadRecord(field, "wrong_type", "expected a string or a list of parts")


def _verl_question(prompt) -> str:
  if isinstance(prompt, str):
    return prompt
  if not isinstance(prompt, list) or not all(
      isinstance(m, dict) for m in prompt
  ):
    raise BadRecord("prompt", "wrong_type", "expected a chat list or string")
  users = [
      _text(m.get("content"), f"prompt[{i}].content")
      for i, m in enumerate(prompt)
      if m.get("role") == "user"
  ]
  if not users:
    raise BadRecord("prompt", "missing_field", "no user turn")
  return "\n".join(users)


def _answer(value, field: str):
  # Graders store one gold answer, sometimes as a one-element list.
  if isinstance(value, list) and len(value) == 1:
    value = value[0]
  if value is None:
    raise BadRecord(field, "missing_field", "required")
  return value


def from_layout(row: dict[str, Any], index: int) -> dict[str, Any]:
  """A verl, EasyR1 or JSONL-layout row -> the JSONL record layout.

  Args:
    row: one row as Python values (structs as dicts).
    index: the row's index in its file, the id when the row has none.

  Raises:
    BadRecord: naming the source layout's field.
  """
  rid = row.get("id")
  extra = row.get("extra_info")
  if rid is None and isinstance(extra, dict):
    rid = extra.get("index")  # verl's
  rid = index if rid is None else rid
  try:
    return _layout(row, rid)
  except BadRecord as bad:
    bad.record_id = rid
    raise


def _layout(row: dict[str, Any], rid) -> dict[str, Any]:
  out = {k: row[k] for k in _OPTIONAL if row.get(k) is not None}
  if "prompt" in row or "reward_model" in row:  # verl
    out["question"] = _verl_question(row.get("prompt"))
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, dict):
      raise BadRecord("reward_model.ground_truth", "missing_field", "required")
    out["answer"] = _answer(
        reward_model.get("ground_truth"), "reward_model.ground_truth"
    )
  elif "problem" in row:  # EasyR1
    out["question"] = row["problem"]
    out["answer"] = _answer(row.get("answer"), "answer")
  else:
    out["question"] = row.get("question")
    out["answer"] = row.get("answer")
  if isinstance(out["question"], str):
    out["question"] = _PLACEHOLDER.sub(" ", out["question"]).strip()
  images = row.get("images")
  if isinstance(images, (bytes, dict)):
    images = [images]
  out["images"] = images
  out["id"] = rid
  return out


def _rows(rows: Iterator[dict[str, Any]]):
  """(line, read) pairs for `jsonl.check_records`."""
  for i, row in enumerate(rows):
    yield i + 1, lambda row=row, i=i: from_layout(row, i)


@formats.FORMATS.register("parquet")
def iter_parquet(
    path: str, report: jsonl.JsonlReport | None = None
) -> Iterator[dict[str, Any]]:
  """Yields the good records of a parquet file, filling `report`."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  report = report if report is not None else jsonl.JsonlReport(path)
  try:
    table = pq.ParquetFile(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path}: not a readable parquet file: {e}") from None

  def rows():
    for batch in table.iter_batches(batch_size=256):
      yield from batch.to_pylist()

  base_dir = os.path.dirname(os.path.abspath(path))
  yield from jsonl.check_records(report, _rows(rows()), base_dir)


@formats.FORMATS.register("hf")
def iter_hf(
    path: str, report: jsonl.JsonlReport | None = None
) -> Iterator[dict[str, Any]]:
  """Yields the good records of a `save_to_disk` folder, filling `report`.

  Images stay encoded (their columns are read with `decode=False`).
  """
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        "data.format=hf reads HF `datasets` folders and needs the package:"
        " pip install datasets (or save the data as parquet and use"
        " data.format=parquet)"
    ) from None
  report = report if report is not None else jsonl.JsonlReport(path)
  ds = datasets.load_from_disk(path)
  if isinstance(ds, datasets.DatasetDict):
    raise ValueError(
        f"{path} holds splits {list(ds)}; name one split's folder per"
        " data.files entry"
    )
  for name, feature in ds.features.items():
    if isinstance(feature, datasets.Image):
      ds = ds.cast_column(name, datasets.Image(decode=False))
    elif isinstance(feature, datasets.Sequence) and isinstance(
        feature.feature, datasets.Image
    ):
      ds = ds.cast_column(name, datasets.Sequence(datasets.Image(decode=False)))
    elif (
        isinstance(feature, list)
        and feature
        and isinstance(feature[0], datasets.Image)
    ):
      ds = ds.cast_column(name, [datasets.Image(decode=False)])
  base_dir = os.path.abspath(path)
  yield from jsonl.check_records(report, _rows(iter(ds)), base_dir)
