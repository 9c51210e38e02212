r"""DAPO + EASE (docs/methods.md 3): the response's attention at layer
floor(2L/3), K = 64 sampled response rows, heads averaged, renormalised over
the visual tokens, pulled toward the evidence Gaussian-mixture target with
KL(target || attention), only on trajectories with reward >= tau = 0.5;
L = L_DAPO + 0.001 * L_attn. EASE's own runs used clip_high = 0.3.

  python -m faithful_rl.train \
    --config=configs/qwen2_5_vl_ease.py:variant=7b,hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct,data=/data/train_with_boxes.jsonl \
    --workdir=/runs/ease_7b
  python -m faithful_rl.train --config=configs/qwen2_5_vl_ease.py:demo \
    --workdir=workdirs/ease_demo        # the demo's tiny model, CPU
  python -m faithful_rl.train --config=configs/qwen2_5_vl_ease.py:runlocal \
    --workdir=/tmp/ease_local

Switches ([open] points of the paper): --config.rl.ease.direction=
model_to_target, --config.rl.ease.renormalize=False, --config.rl.ease.gate=
False (ablation), --config.rl.ease.no_box=skip, --config.rl.ease.layers=
'(12,16)', --config.rl.ease.weight=..., --config.rl.ease.tau=...

Arguments (variant, hf_dir, data, eval_data, demo, runlocal): see
configs/common.py.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.RECIPE_ARGS)
  c = common.recipe(arg, "dapo")
  if not arg.demo:
    c.rl.clip_high = 0.3  # EASE's runs
  c.rl.ease.enabled = True
  c.rl.ease.weight = 0.001
  c.rl.ease.tau = 0.5
  c.rl.ease.num_queries = 64
  return common.sized(c, arg)
