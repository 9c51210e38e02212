"""Dataset formats by name (`data.format`): users' files to records.

A format is a reader `fn(path, report) -> Iterator[record]`, registered in
`FORMATS`: it yields the good records of one file (the layout of
`faithful_rl.data.jsonl`, images as encoded bytes) and fills `report`, a
`jsonl.JsonlReport`, with each bad record (file, line or row, record id,
field, reason). Built in: "jsonl" (`data.jsonl`), "parquet" and "hf"
(`data.parquet`: the verl and EasyR1 layouts). The records become the
`jsonl_vqa/<name>` TFDS dataset (`builders.build_jsonl`). A new format is
one file built on `jsonl.check_records`, so bad records are reported
as every other format's:

  from faithful_rl.data import formats, jsonl

  @formats.FORMATS.register("csv")
  def read_csv(path, report):
    rows = ...  # (line, read) pairs, read() -> a raw record
    yield from jsonl.check_records(report, rows, os.path.dirname(path))

  # --config.data.format=csv --config.data.files.train=/data/train.csv
"""

from __future__ import annotations

from faithful_rl import registry
from faithful_rl.data import jsonl

FORMATS = registry.Registry("dataset format", "data.format", "formats.FORMATS")
FORMATS.register("jsonl", jsonl.iter_jsonl)


def get(name: str):
  """The reader registered as `name` (the built-in ones included)."""
  # pylint: disable-next=g-import-not-at-top,unused-import
  from faithful_rl.data import parquet  # registers "parquet" and "hf"

  return FORMATS.get(name)
