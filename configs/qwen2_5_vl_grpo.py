r"""GRPO on Qwen2.5-VL-3B/7B-Instruct (METHODS 1): symmetric clip 0.2,
seq-mean-token-mean, k3 reference KL (beta 0.04), no dynamic sampling.

  python -m faithful_rl.train \
    --config=configs/qwen2_5_vl_grpo.py:variant=3b,hf_dir=/ckpt/Qwen2.5-VL-3B-Instruct,data=/data/train.jsonl \
    --workdir=/runs/grpo_3b
  python -m faithful_rl.train --config=configs/qwen2_5_vl_grpo.py:runlocal \
    --workdir=/tmp/grpo_local
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.REAL_ARGS)
  c = common.base_config()
  common.set_algorithm(c, "grpo")
  c.stages = ("rl",)
  return common.qwen2_5_vl_real(c, arg)
