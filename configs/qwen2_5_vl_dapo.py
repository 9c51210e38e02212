r"""DAPO on Qwen2.5-VL-3B/7B-Instruct (METHODS 2): clip-higher, token-mean,
dynamic sampling, overlong shaping, no reference KL, frozen vision tower.

  python -m faithful_rl.train \
    --config=configs/qwen2_5_vl_dapo.py:variant=7b,hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct,data=/data/train.jsonl,eval_data=/data/val.jsonl \
    --workdir=/runs/dapo_7b
  python -m faithful_rl.train --config=configs/qwen2_5_vl_dapo.py:runlocal \
    --workdir=/tmp/dapo_local
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.REAL_ARGS)
  c = common.base_config()
  common.set_algorithm(c, "dapo")
  c.stages = ("rl",)
  return common.qwen2_5_vl_real(c, arg)
