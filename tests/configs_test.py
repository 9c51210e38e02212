"""Every config builds its model and train state under jax.eval_shape."""

import glob
import importlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from faithful_rl import models
from faithful_rl import rl
from faithful_rl import steps
from faithful_rl import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not os.path.basename(p).startswith(("common", "__"))
)
# Parameter counts of the published checkpoints (their model cards;
# Qwen3-VL: transformers' classes built at the published shapes).
PUBLISHED = {"3b": (3.70e9, 3.80e9), "7b": (8.25e9, 8.35e9)}
QWEN3_VL = {"2b": 2.128e9, "4b": 4.438e9, "8b": 8.767e9}
PUBLISHED.update({k: (0.995 * n, 1.005 * n) for k, n in QWEN3_VL.items()})


def _variants(name):
  return ("4b", "8b") if name.startswith("qwen3_vl") else ("3b", "7b")


def _args(name):
  if name == "demo":
    return [None, "demo", "runlocal"]
  return [f"variant={v}" for v in _variants(name)] + ["demo", "runlocal"]


def _num_params(model_config, dtype=jnp.float32) -> tuple[dict, int]:
  _, abstract = nnx.eval_shape(
      lambda: nnx.split(models.create(model_config, dtype=dtype))
  )
  params = nnx.to_pure_dict(abstract)
  return params, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


CASES = [(n, a) for n in NAMES for a in _args(n)]


def test_every_config_documents_the_command_that_runs_it():
  assert "demo" in NAMES
  for name in NAMES:
    doc = importlib.import_module(f"configs.{name}").__doc__ or ""
    assert f"python -m faithful_rl.train --config=configs/{name}.py" in (
        " ".join(doc.replace("\\", " ").split())
    ), name


@pytest.mark.parametrize("name,arg", CASES)
def test_config_builds_model_and_train_state(name, arg):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(arg)
  rl.check_sizes(config.rl)  # chunks and micro-batches divide the batch
  assert config.sft.batch_size % config.sft.micro_batch == 0
  model_config = train.model_config_for(config)
  params, n = _num_params(model_config, jnp.dtype(config.model.dtype))
  if arg and arg.startswith("variant="):
    lo, hi = PUBLISHED[arg.split("=")[1]]
    assert lo < n < hi, n
  for stage in config.stages:
    tx = train.make_tx(config, stage, params, 10)
    state = jax.eval_shape(
        lambda p: steps.TrainState(p, tx.init(p), jnp.zeros((), jnp.int32)),
        params,
    )
    assert jax.tree.structure(state.params) == jax.tree.structure(params)
    frozen = [p for p, m in config[stage].optim.get("groups", ()) if m == 0]
    labels = jax.tree_util.tree_leaves_with_path(params)
    trained = sum(
        int(np.prod(x.shape))
        for path, x in labels
        if not any(re.search(f, train.sharding.path_str(path)) for f in frozen)
    )
    moments = sum(
        int(np.prod(x.shape))
        for x in jax.tree.leaves(state.opt_state)
        if len(x.shape) >= 1
    )
    # AdamW keeps two moments per trained parameter, none for frozen ones.
    assert moments == 2 * trained
    if frozen:
      assert trained < n


@pytest.mark.parametrize("name", NAMES)
def test_demo_and_runlocal_each_mean_one_thing(name):
  module = importlib.import_module(f"configs.{name}")
  d, r = module.get_config("demo"), module.get_config("runlocal")
  # demo: the tiny model from scratch, SFT warm start, then the method.
  assert d.model.init == "scratch" and d.stages == ("sft", "rl")
  assert d.rl.steps >= 50 and d.sft.steps >= 100  # the demo: 60 and 200
  # runlocal: the recipe's own stages and method, a minute on a CPU.
  assert r.model.init == "scratch" and r.rl.steps <= 2 and r.sft.steps <= 4
  assert r.model.dtype == "float32" and r.rl.num_prompts <= 4
  if name != "demo":
    real = module.get_config(f"variant={_variants(name)[0]}")
    assert r.stages == real.stages
    assert r.rl.loss == real.rl.loss and r.rl.kl_beta == real.rl.kl_beta
    for block in ("ease", "reinforce", "vppo"):
      assert r.rl[block].enabled == real.rl[block].enabled, block
  rl.check_sizes(d.rl)
  rl.check_sizes(r.rl)
  assert "algorithm" not in r.rl  # the policy loss is chosen by rl.loss
  steps.RLConfig.from_config(r.rl)  # every switch present, no unknown key


@pytest.mark.parametrize("size", sorted(QWEN3_VL))
def test_qwen3_vl_sizes_have_the_published_parameter_counts(size, capsys):
  from faithful_rl.models import archs  # pylint: disable=g-import-not-at-top

  _, n = _num_params(archs.get(f"qwen3_vl_{size}"))
  with capsys.disabled():
    print(f"qwen3_vl_{size}: {n / 1e9:.3f}B parameters")
  assert abs(n / QWEN3_VL[size] - 1) < 0.005, n


def test_qwen3_vl_recipes_carry_ease_published_settings():
  from configs import qwen3_vl_dapo  # pylint: disable=g-import-not-at-top
  from configs import qwen3_vl_ease  # pylint: disable=g-import-not-at-top

  from faithful_rl.models import archs  # pylint: disable=g-import-not-at-top

  for variant in ("4b", "8b"):
    e = qwen3_vl_ease.get_config(f"variant={variant}")
    d = qwen3_vl_dapo.get_config(f"variant={variant}")
    assert e.model.arch == f"qwen3_vl_{variant}"
    assert e.data.processor.max_pixels == 1280 * 32 * 32
    for c in (e, d):
      rl_ = c.rl
      assert (rl_.optim.lr, rl_.num_prompts, rl_.num_samples) == (1e-6, 512, 5)
      assert (rl_.clip_low, rl_.clip_high, rl_.kl_beta) == (0.2, 0.3, 0.0)
      assert rl_.sampling.max_new_tokens == 1024 and c.eval.sampled == 0
      assert rl_.steps == 2 * 128_000 // 512
    assert e.rl.ease.enabled and not d.rl.ease.enabled
    assert (e.rl.ease.weight, e.rl.ease.tau) == (0.001, 0.5)
    cfg = steps.RLConfig.from_config(e.rl)
    assert cfg.ease.layers == ()  # the model's default site:
    assert archs.get(e.model.arch).default_probe_layer == 24  # of 36
  with pytest.raises(ValueError, match="variant must be 4b or 8b"):
    qwen3_vl_ease.get_config("variant=7b")


def test_runlocal_with_a_checkpoint_keeps_it():
  from configs import qwen2_5_vl_ease  # pylint: disable=g-import-not-at-top

  c = qwen2_5_vl_ease.get_config("variant=3b,hf_dir=/ckpt/q3b,runlocal")
  assert c.model.init == "hf" and c.model.hf_dir == "/ckpt/q3b"
  assert c.rl.ease.enabled and c.rl.steps <= 2 and c.rl.num_prompts <= 4
  with pytest.raises(ValueError, match="drop hf_dir"):
    qwen2_5_vl_ease.get_config("demo,hf_dir=/ckpt/q3b")


@pytest.mark.parametrize(
    "arg,match",
    [
        ("varaint=3b", "unknown config argument 'varaint'"),
        ("variant=3b,runloacl", "unknown config argument 'runloacl'"),
        ("variant=13b", "variant must be 3b or 7b"),
        ("runlocal=maybe", "runlocal='maybe' is not a boolean"),
        ("hf_dir", "needs a value"),
    ],
)
def test_misspelled_config_arguments_raise_naming_them(arg, match):
  from configs import qwen2_5_vl_dapo  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match=match):
    qwen2_5_vl_dapo.get_config(arg)
  from configs import demo  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match="unknown config argument 'runlcoal'"):
    demo.get_config("runlcoal")
