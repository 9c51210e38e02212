"""The typed rollout batch, its abstract shapes, and its chunk layouts.

`RolloutBatch` holds one RL step's training batch: B prompts and their
N = B * G sampled responses, rows prompt-major (row b * G + j is sample j
of prompt b). It is built once per step (`rl.collect.assemble`) and carries
everything the analysis pass, the advantage computation and the update
read. Prompt-level arrays lead with B, row-level arrays with N; every
array leads with its batch axis (`position_ids` too, unlike the model's
[3, B, T]), so one rule shards them all and one gather selects rows.

Chunks and micro-batches are a leading axis: `layout` gathers a list of
prompts into [M, p, ...] prompt arrays and [M, u, ...] row arrays, u rows
per chunk. With u >= G a chunk holds p = u / G whole groups; with u < G it
holds u rows of one prompt (the prompt repeated in G / u chunks), so the
rollout, the analysis and the update stay bounded at any group size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from faithful_rl import sharding
from faithful_rl.models.inputs import vision_inputs


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RolloutBatch:
  """One step's batch (see the module docstring).

  Prompt level (B prompts):
    prompt_ids: int32[B, Tp], left-padded.
    prompt_mask: bool[B, Tp].
    position_ids: int32[B, 3, Tp], M-RoPE positions.
    vision: VisionInputs of the images.
    cf_vision: VisionInputs of the counterfactual images (Faithful-MR1's
      'logprob_drop' test), or None.
    ease_target: float32[B, V], the EASE target (0 on padding).
    evidence_mask: bool[B, V], visual tokens inside the evidence boxes.
    has_boxes: bool[B].
    group_ids: int32[B], the group's index in the step (seeds per-prompt
      randomness, e.g. VPPO's perturbation).
  Row level (N = B * G rows):
    tokens: int32[N, R], sampled responses.
    mask: bool[N, R], the tokens the loss sees (overlong filtering off).
    old_logp: float32[N, R], log-probs under the sampling policy.
    ref_logp: float32[N, R] under the reference policy, or None.
    token_weights: float32[N, R], VPPO's token filter (ones otherwise).
    advantages: float32[N].
    rewards: float32[N], the total reward of each response.
    correct: float32[N], answer correctness in {0, 1} (EASE's gate).
    correct_cf: float32[N], correctness of the counterfactual rollout
      (Faithful-MR1's 'rollout_flip' test), or None.
    truncated: bool[N], no stop token within R.
    row_ids: int32[N], the row's index in the step (seeds per-row
      randomness, so chunking never changes a row's draws).
  """

  prompt_ids: Any
  prompt_mask: Any
  position_ids: Any
  vision: Any
  cf_vision: Any
  ease_target: Any
  evidence_mask: Any
  has_boxes: Any
  group_ids: Any
  tokens: Any
  mask: Any
  old_logp: Any
  ref_logp: Any
  token_weights: Any
  advantages: Any
  rewards: Any
  correct: Any
  correct_cf: Any
  truncated: Any
  row_ids: Any

  PROMPT_FIELDS = (
      "prompt_ids", "prompt_mask", "position_ids", "vision", "cf_vision",
      "ease_target", "evidence_mask", "has_boxes", "group_ids",
  )  # fmt: skip
  ROW_FIELDS = (
      "tokens", "mask", "old_logp", "ref_logp", "token_weights",
      "advantages", "rewards", "correct", "correct_cf", "truncated",
      "row_ids",
  )  # fmt: skip

  @property
  def rows_per_prompt(self) -> int:
    """G for a whole batch; u / p within a chunk (static)."""
    return self.tokens.shape[-2] // self.prompt_ids.shape[-2]

  def prompt_inputs(self, vision: Any = "same") -> dict[str, Any]:
    """The prompt dict `forward.score` and `rollout.Engine` take.

    `vision`: "same" (this batch's images), or other VisionInputs.
    """
    pos = self.position_ids
    if isinstance(pos, jax.ShapeDtypeStruct):  # abstract (for lowering)
      shape = (pos.shape[1], pos.shape[0]) + pos.shape[2:]
      pos = jax.ShapeDtypeStruct(shape, pos.dtype)
    else:
      pos = jnp.swapaxes(pos, 0, 1)
    return dict(
        prompt_ids=self.prompt_ids,
        prompt_mask=self.prompt_mask,
        position_ids=pos,
        vision=self.vision if vision == "same" else vision,
    )

  def prompt_part(self) -> dict[str, Any]:
    return {k: getattr(self, k) for k in self.PROMPT_FIELDS}

  def row_part(self) -> dict[str, Any]:
    return {k: getattr(self, k) for k in self.ROW_FIELDS}

  @classmethod
  def abstract(
      cls,
      *,
      prompts: int,
      num_samples: int,
      prompt_len: int,
      patches: int,
      response_len: int,
      model_config,
      ref_logp: bool = False,
      cf_vision: bool = False,
      correct_cf: bool = False,
      leading: tuple[int, ...] = (),
  ) -> "RolloutBatch":
    """`jax.ShapeDtypeStruct`s of a batch, for lowering without data.

    Args:
      prompts: B. num_samples: rows per prompt (G, or u / p in a chunk).
      prompt_len, patches, response_len: the buckets Tp, P, R.
      model_config: the model's config (vision layout, patch size).
      ref_logp, cf_vision, correct_cf: include these optional fields.
      leading: extra leading axes, e.g. (M,) for an update's micro-batches.
    """
    b, n = prompts, prompts * num_samples
    one = vision_inputs(
        [np.zeros((0, model_config.vision.patch_dim), np.float32)],
        [[]],
        patches,
        model_config.vision,
    )
    lead = tuple(leading)
    vis = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(lead + (b,) + x.shape[1:], x.dtype), one
    )
    v = patches // model_config.vision.merge_unit
    s = lambda shape, dt: jax.ShapeDtypeStruct(lead + shape, jnp.dtype(dt))
    return cls(
        prompt_ids=s((b, prompt_len), "int32"),
        prompt_mask=s((b, prompt_len), "bool"),
        position_ids=s((b, 3, prompt_len), "int32"),
        vision=vis,
        cf_vision=vis if cf_vision else None,
        ease_target=s((b, v), "float32"),
        evidence_mask=s((b, v), "bool"),
        has_boxes=s((b,), "bool"),
        group_ids=s((b,), "int32"),
        tokens=s((n, response_len), "int32"),
        mask=s((n, response_len), "bool"),
        old_logp=s((n, response_len), "float32"),
        ref_logp=s((n, response_len), "float32") if ref_logp else None,
        token_weights=s((n, response_len), "float32"),
        advantages=s((n,), "float32"),
        rewards=s((n,), "float32"),
        correct=s((n,), "float32"),
        correct_cf=s((n,), "float32") if correct_cf else None,
        truncated=s((n,), "bool"),
        row_ids=s((n,), "int32"),
    )


def repeat_rows(x, g: int):
  """A prompt-level array [b, ...] repeated for its g rows: [b * g, ...]."""
  return jax.tree.map(lambda a: jnp.repeat(a, g, axis=0), x)


# ---------------------------------------------------------------------------
# Chunk layouts.
# ---------------------------------------------------------------------------


def check_chunk(rows: int, num_samples: int, what: str) -> None:
  """Raises naming `what` unless `rows` chunks a group size G cleanly."""
  g = num_samples
  if rows <= 0 or (rows % g if rows >= g else g % rows):
    raise ValueError(
        f"{what}={rows} rows must be a multiple of the group size G={g} or"
        " divide it"
    )


def plan(order, num_samples: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
  """Chunks of `rows` rows over the prompts `order` (in that order).

  Returns (prompt_idx int32[M, p], row_idx int32[M, u]): chunk m holds
  prompts prompt_idx[m] and the rows row_idx[m] of the full batch (rows of
  prompt b are b * G .. b * G + G - 1), prompt-major. u = rows.
  """
  g = num_samples
  check_chunk(rows, g, "chunk")
  order = np.asarray(order, np.int64)
  if rows >= g:
    p = rows // g
    if len(order) % p:
      raise ValueError(
          f"{len(order)} prompts do not split into chunks of {p} prompts"
          f" ({rows} rows at G={g})"
      )
    prompt_idx = order.reshape(-1, p)
    row_idx = (prompt_idx[..., None] * g + np.arange(g)).reshape(-1, rows)
  else:
    s = g // rows
    prompt_idx = np.repeat(order, s)[:, None]
    sub = np.tile(np.arange(s), len(order))
    row_idx = order.repeat(s)[:, None] * g + sub[:, None] * rows
    row_idx = row_idx + np.arange(rows)[None]
  return prompt_idx.astype(np.int32), row_idx.astype(np.int32)


def _take(batch: RolloutBatch, prompt_idx, row_idx) -> RolloutBatch:
  take = lambda idx: lambda x: jnp.take(x, idx, axis=0)
  prompts = jax.tree.map(take(prompt_idx), batch.prompt_part())
  rows = jax.tree.map(take(row_idx), batch.row_part())
  return RolloutBatch(**prompts, **rows)


def layout(batch: RolloutBatch, order, rows: int, mesh=None) -> RolloutBatch:
  """The batch's prompts `order` as chunks of `rows` rows: [M, ...] fields.

  On `mesh`, each chunk's rows are sharded over (data, fsdp) where they
  divide. Row-level outputs computed per chunk come back to batch order
  with `unlayout`.
  """
  prompt_idx, row_idx = plan(order, batch.rows_per_prompt, rows)
  out_sh = None
  if mesh is not None:
    shapes = jax.eval_shape(_take, batch, prompt_idx, row_idx)
    out_sh = sharding.stacked_shardings(mesh, shapes)
  return _jit_take(out_sh)(batch, prompt_idx, row_idx)


_TAKE_CACHE: dict[Any, Any] = {}


def _jit_take(out_shardings):
  key = None if out_shardings is None else str(out_shardings)
  if key not in _TAKE_CACHE:
    _TAKE_CACHE[key] = jax.jit(_take, out_shardings=out_shardings)
  return _TAKE_CACHE[key]


def unlayout(x, num_rows: int):
  """Per-chunk row outputs [M, u, ...] of `layout(batch, arange(B), u)`
  back to batch order [N, ...] (that layout keeps rows in order)."""
  return jax.tree.map(lambda a: a.reshape((num_rows,) + a.shape[2:]), x)


# ---------------------------------------------------------------------------
# Prompt arrays padded to a larger bucket.
# ---------------------------------------------------------------------------


def pad_prompts(
    arrays: dict[str, Any],
    grids,
    *,
    prompt_len: int,
    patches: int,
    model_config,
) -> dict[str, Any]:
  """Collated prompt arrays re-padded to larger buckets (host numpy).

  `arrays` holds collated prompt-level arrays as `batching.collate` makes
  them (position_ids [B, 3, Tp] here) and `grids` each prompt's image
  grids. Prompts are left-padded to `prompt_len`; the vision layout is
  rebuilt by `models.inputs.vision_inputs` for `patches` from the
  prompts' own patches, so the result equals collating at those buckets.
  """
  from faithful_rl.models.inputs import rope_index  # pylint: disable=g-import-not-at-top

  out = dict(arrays)
  tp = arrays["prompt_ids"].shape[1]
  if prompt_len < tp or patches < arrays["vision"].num_patches:
    raise ValueError("pad_prompts only grows buckets")
  if prompt_len > tp:
    pad = ((0, 0), (prompt_len - tp, 0))
    pad_id = model_config.pad_token_id or 0
    out["prompt_ids"] = np.pad(
        arrays["prompt_ids"], pad, constant_values=pad_id
    )
    out["prompt_mask"] = np.pad(arrays["prompt_mask"], pad)
    pos, _ = rope_index(out["prompt_ids"], out["prompt_mask"], grids,
                        model_config)  # fmt: skip
    out["position_ids"] = np.swapaxes(pos, 0, 1)
  if patches > arrays["vision"].num_patches:
    counts = [sum(t * h * w for t, h, w in g) for g in grids]
    for key in ("vision", "cf_vision"):
      if arrays.get(key) is not None:
        pix = np.asarray(arrays[key].pixel_values)
        out[key] = vision_inputs(
            [pix[i, :c] for i, c in enumerate(counts)],
            grids,
            patches,
            model_config.vision,
        )
    v = patches // model_config.vision.merge_unit
    for key in ("ease_target", "evidence_mask"):
      x = arrays[key]
      out[key] = np.pad(x, ((0, 0), (0, v - x.shape[1])))
  return out


__all__ = [
    "RolloutBatch",
    "layout",
    "pad_prompts",
    "plan",
    "repeat_rows",
    "unlayout",
]
