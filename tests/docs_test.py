"""The README's map names real functions; nothing points outside the repo."""

import importlib
import os
import re
import subprocess

from configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _resolve(dotted: str):
  """`losses.dapo_loss`, `rl.rounds.collect` -> the object (or raises)."""
  parts = dotted.split(".")
  obj = importlib.import_module(f"faithful_rl.{parts[0]}")
  for name in parts[1:]:
    obj = getattr(obj, name)
  return obj


def test_the_readme_map_names_real_functions():
  text = open(os.path.join(ROOT, "README.md")).read()
  table = text[text.index("## Map") : text.index("A new loss is one file")]
  names = set(
      re.findall(r"`((?:losses|rl|steps|data)\.[a-z_.]+[a-z_])`", table)
  )
  config = common.base_config()
  functions = 0
  for name in sorted(names):
    # A config key (rl.clip_ratio_c, data.processor.focus_token)? A name
    # that descends into a config value (`rl.loss.rl_loss`: rl.loss is
    # the string "dapo") is not one.
    node = config
    for k in name.split("."):
      node = node.get(k) if hasattr(node, "get") else None
    if node is not None:
      continue
    assert callable(_resolve(name)), name
    functions += 1
  assert functions >= 15, names


def test_docs_are_linked_and_nothing_points_outside_the_repository():
  readme = open(os.path.join(ROOT, "README.md")).read()
  for doc in ("docs/methods.md", "docs/design.md"):
    assert os.path.exists(os.path.join(ROOT, doc)) and f"({doc})" in readme
  files = subprocess.run(
      ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True
  ).stdout.split()
  outside = "shared" + "/"  # spelled apart so this file does not match
  hits = [
      f
      for f in files
      if os.path.isfile(os.path.join(ROOT, f))
      and not f.endswith((".png", ".json"))
      and outside in open(os.path.join(ROOT, f), errors="ignore").read()
  ]
  assert not hits, hits
