r"""A trained run as a Hugging Face folder that transformers and vLLM load.

  python -m faithful_rl.export --workdir=/runs/dapo_7b --out=/ckpt/dapo_7b
  python -m faithful_rl.export --workdir=/runs/dapo_7b --step=150 \
      --out=/ckpt/dapo_7b_150 --dtype=float32

Writes the checkpoint's parameters (the latest step unless `--step` names
one) as safetensors (bfloat16 by default, as published checkpoints are;
`--dtype=float32` keeps the float32 masters), `config.json` naming the
family's transformers class, and copies, byte for byte, the tokenizer,
chat template, processor settings (`preprocessor_config.json`, the
published ones, not the run's training-time pixel bounds) and
`generation_config.json` of the folder the run started from
(`config.model.hf_dir`; the demo tokenizer for a from-scratch model).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp

from faithful_rl import checkpointing
from faithful_rl import models
from faithful_rl.data import tokenizer as tok_lib

DTYPES = ("bfloat16", "float32")


class ExportError(RuntimeError):
  """The workdir or the step cannot be exported; the message says why."""


def source_dir(config) -> str:
  """The HF folder whose tokenizer / processor / generation files the run
  carries: the one it started from (the demo tokenizer from scratch)."""
  if config.model.init == "scratch":
    return tok_lib.demo_tokenizer_dir()
  return config.model.hf_dir


def export(
    workdir: str,
    out_dir: str,
    *,
    step: int | None = None,
    dtype: str = "bfloat16",
) -> str:
  """Writes `workdir`'s checkpoint at `step` (default: the latest) to
  `out_dir` as a HF folder; returns `out_dir`.

  Raises ExportError naming what is missing: no run config, no
  checkpoint, a step that is not among the saved ones, an unknown dtype,
  a source folder that is gone.
  """
  from faithful_rl import inference  # pylint: disable=g-import-not-at-top

  if dtype not in DTYPES:
    raise ExportError(f"--dtype must be one of {DTYPES}, not {dtype!r}")
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")) or (
      not os.path.isfile(os.path.join(workdir, "config.json"))
  ):
    raise ExportError(
        f"{workdir} is not a training run's workdir (no checkpoints/ and"
        " config.json); give the --workdir that `python -m"
        " faithful_rl.train` wrote"
    )
  try:
    step = checkpointing.resolve_step(workdir, step)
  except FileNotFoundError as e:
    raise ExportError(str(e)) from None
  config = inference.load_config(workdir)
  source = source_dir(config)
  if not os.path.isdir(source):
    raise ExportError(
        f"the run started from {source!r}, which is not a folder here; its"
        " tokenizer and processor files are what the export carries"
    )
  model = inference.load_model(workdir, step, config)
  names = models.save_pretrained(
      model, out_dir, dtype=jnp.dtype(dtype), copy_files_from=source
  )
  print(f"[export] {workdir} step {step} -> {out_dir}: {', '.join(names)}")
  return out_dir


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m faithful_rl.export",
      description=__doc__.split("\n")[0],
  )
  parser.add_argument("--workdir", required=True, help="the training run")
  parser.add_argument("--out", required=True, help="the HF folder to write")
  parser.add_argument(
      "--step", type=int, default=None, help="default: the latest checkpoint"
  )
  parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
  args = parser.parse_args(argv)
  try:
    export(args.workdir, args.out, step=args.step, dtype=args.dtype)
  except ExportError as e:
    print(f"[faithful_rl.export] {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
