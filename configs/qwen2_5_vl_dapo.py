r"""DAPO on Qwen2.5-VL-3B/7B-Instruct (docs/methods.md 2): clip-higher,
token-mean, dual clip, dynamic sampling, overlong shaping, no reference KL,
frozen vision tower.

  python -m faithful_rl.train \
    --config=configs/qwen2_5_vl_dapo.py:variant=7b,hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct,data=/data/train.jsonl,eval_data=/data/val.jsonl \
    --workdir=/runs/dapo_7b
  python -m faithful_rl.train --config=configs/qwen2_5_vl_dapo.py:demo \
    --workdir=workdirs/dapo_demo        # the demo's tiny model, CPU
  python -m faithful_rl.train --config=configs/qwen2_5_vl_dapo.py:runlocal \
    --workdir=/tmp/dapo_local

Arguments (variant, hf_dir, data, eval_data, demo, runlocal): see
configs/common.py.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.RECIPE_ARGS)
  c = common.recipe(arg, "dapo")
  return common.sized(c, arg)
