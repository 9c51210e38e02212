r"""GRPO on Qwen2.5-VL-3B/7B-Instruct (docs/methods.md 1): symmetric clip
0.2, seq-mean-token-mean, k3 reference KL (beta 0.04), no dynamic sampling.

  python -m faithful_rl.train \
    --config=configs/qwen2_5_vl_grpo.py:variant=3b,hf_dir=/ckpt/Qwen2.5-VL-3B-Instruct,data=/data/train.jsonl \
    --workdir=/runs/grpo_3b
  python -m faithful_rl.train --config=configs/qwen2_5_vl_grpo.py:demo \
    --workdir=workdirs/grpo_demo        # the demo's tiny model, CPU
  python -m faithful_rl.train --config=configs/qwen2_5_vl_grpo.py:runlocal \
    --workdir=/tmp/grpo_local

Arguments (variant, hf_dir, data, eval_data, demo, runlocal): see
configs/common.py.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.RECIPE_ARGS)
  c = common.recipe(arg, "grpo")
  return common.sized(c, arg)
