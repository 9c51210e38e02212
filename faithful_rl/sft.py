"""The SFT (+ Faithful-MR1 anchoring) stage's step, as the RL learner's.

`Learner.step(state, rng) -> (state, metrics)`: the next batch of this
process's share of the data, placed on the mesh, as micro-batches of
`sft.micro_batch` rows, through one jitted update (`steps.make_update`
with `steps.SFT`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from faithful_rl import metrics as metrics_lib
from faithful_rl import optim
from faithful_rl import sharding
from faithful_rl import steps

KEYS = (
    "prompt_ids", "prompt_mask", "position_ids", "vision", "focus_target",
    "has_boxes", "response_ids", "response_mask", "example_mask",
)  # fmt: skip


def micro_batches(batch: dict, rows: int):
  """[B, ...] -> [B / rows, rows, ...], micro-batch m holding rows m, m + M,
  m + 2M, ...: each micro-batch takes rows from every device's block, so
  the rows stay spread over the batch axes with no data movement."""
  b = jax.tree.leaves(batch)[0].shape[0]
  if b % rows:
    raise ValueError(f"sft.micro_batch={rows} does not divide the batch {b}")
  m = b // rows
  return jax.tree.map(
      lambda x: x.reshape((rows, m) + x.shape[1:]).swapaxes(0, 1), batch
  )


class Learner:
  """The SFT stage's step.

  Args:
    config: the run's config (`config.sft` is read).
    graphdef, tx, mesh, state_shardings: as `rl.Learner`.
    batches: this process's share of the SFT batches (an iterator of
      `batching.Batch`).
  """

  def __init__(self, config, *, graphdef, tx, mesh, batches,
               state_shardings=None):  # fmt: skip
    self.config, self.mesh, self.batches = config, mesh, batches
    self.micro_batch = int(config.sft.micro_batch)
    cfg = steps.SFTConfig.from_config(config.sft)
    update = steps.make_update(
        steps.SFT,
        tx,
        graphdef,
        cfg,
        state_shardings=state_shardings,
        frozen=optim.frozen_patterns(config.sft.optim),
    )
    layout = jax.jit(micro_batches, static_argnums=1)
    self._update = lambda s, b, r: update(s, layout(b, self.micro_batch), r)

  def step(self, state: steps.TrainState, rng) -> tuple[Any, dict]:
    arrays = next(self.batches).arrays
    batch = {k: arrays[k] for k in KEYS}
    batch["position_ids"] = np.swapaxes(batch["position_ids"], 0, 1)
    if int(state.step) == self.config.debug.nan_at_step:  # test hook
      batch["vision"].pixel_values[:] = np.nan
    state, m = self._update(state, sharding.global_batch(self.mesh, batch), rng)
    return state, metrics_lib.scalars(jax.device_get(m))
