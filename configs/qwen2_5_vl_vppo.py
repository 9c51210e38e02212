r"""VPPO (docs/methods.md 5): DAPO plus a perturbed-image branch (each 14-px
patch blackened with p = 0.5); per-token visual dependency S = exp(d) - d - 1
(clamped to [0, 10]); only the top 40% of each response's tokens by S get
gradient; advantages scaled by beta_min + s (beta_max - beta_min) with s
the min-max normalised mean dependency of the response.

  python -m faithful_rl.train \
    --config=configs/qwen2_5_vl_vppo.py:variant=7b,hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct,data=/data/train.jsonl \
    --workdir=/runs/vppo_7b
  python -m faithful_rl.train --config=configs/qwen2_5_vl_vppo.py:demo \
    --workdir=workdirs/vppo_demo
  python -m faithful_rl.train --config=configs/qwen2_5_vl_vppo.py:runlocal \
    --workdir=/tmp/vppo_local

Arguments (variant, hf_dir, data, eval_data, demo, runlocal): see
configs/common.py.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.RECIPE_ARGS)
  c = common.recipe(arg, "vppo")
  c.rl.vppo = dict(enabled=True, drop_prob=0.5, topk=0.4, beta_min=0.9)
  return common.sized(c, arg)
