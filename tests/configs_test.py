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
from faithful_rl import steps
from faithful_rl import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not os.path.basename(p).startswith(("common", "__"))
)
# Parameter counts of the published checkpoints (their model cards).
PUBLISHED = {"3b": (3.70e9, 3.80e9), "7b": (8.25e9, 8.35e9)}


def _args(name):
  if name == "demo":
    return [None, "runlocal"]
  return ["variant=3b", "variant=7b", "runlocal"]


CASES = [(n, a) for n in NAMES for a in _args(n)]


def test_there_are_configs():
  assert "demo" in NAMES and len(NAMES) >= 3


@pytest.mark.parametrize("name,arg", CASES)
def test_config_builds_model_and_train_state(name, arg):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(arg)
  model_config = train.model_config_for(config)
  dtype = jnp.dtype(config.model.dtype)
  _, abstract = nnx.eval_shape(
      lambda: nnx.split(models.create(model_config, dtype=dtype))
  )
  params = nnx.to_pure_dict(abstract)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
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
