"""A rollout that keeps its batch full: windowed decoding with slot refill.

`rollout._sample_program` decodes a chunk of rows in one loop until every
row has stopped, so a row that ended early keeps its slot: a chunk with one
long straggler runs the straggler's steps at every row's cost. Here S slots
decode the call's B * G (prompt, sample) rows as a queue:

  1. `_insert`: the next prompts are prefilled and written into free slots
     (slot indices traced: one program per prompt bucket and insert size),
     each prompt's first token chosen from its prompt's logits.
  2. `_window`: up to W decoding steps over all S slots (one compiled
     `lax.while_loop`), finished slots masked (they neither advance nor
     write), each slot at its own step (per-row cache index and position).
  3. On the host, between windows: slots whose rows finished are free;
     back to 1 until the queue is empty and every slot has finished.

With G > 1 a prompt's G samples take G consecutive slots (a group) and are
refilled together, so the prompt's keys and values stay one shared prefix
of its G rows (a prefix cache of S / G prompts beside the S rows' response
caches), as in the static sampler. With G = 1 each slot holds its prompt
and response in one cache, as there too.

Row n draws its token t with the key fold_in(fold_in(rng, row_ids[n]), t)
(`sampling.next_tokens`), the static sampler's: its response is the same
whatever slot, window, S or W it ran with. Each call's responses are
written on the device into [B * G, R] arrays, so the host reads only S
flags per window.

Memory: the caches are those of S rows (S * (Tp + R) slots for G = 1;
S / G * Tp + S * R for G > 1) whatever the queue's length; the queue's
prompts stay in the call's batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from faithful_rl import rollout
from faithful_rl.models.decoder import KVCache
from faithful_rl.sampling import SamplingConfig
from faithful_rl.sampling import next_tokens


@dataclasses.dataclass(frozen=True)
class Refill:
  """How a refilled rollout runs (hashable).

  Attributes:
    slots: S, rows decoded at once (a multiple of G).
    window: W, decoding steps per compiled window; the host refills free
      slots between windows (one sync of S flags each).
  """

  slots: int
  window: int = 32

  def check(self, num_samples: int) -> None:
    if self.slots <= 0 or self.window <= 0:
      raise ValueError(
          f"rl.rollout_slots={self.slots} and rl.decode_window="
          f"{self.window} must be > 0"
      )
    if self.slots % num_samples:
      raise ValueError(
          f"rl.rollout_slots={self.slots} is not a multiple of G="
          f"{num_samples} (a prompt's samples share G slots)"
      )


@dataclasses.dataclass
class Stats:
  """What a refilled call ran (the benchmarks' slot occupancy).

  Attributes:
    steps: decoding steps run (forwards of all S slots), windows summed.
    slots: S.
    windows: compiled windows run.
    inserts: insert programs run.
  """

  steps: int = 0
  slots: int = 0
  windows: int = 0
  inserts: int = 0


def _rows_at(cache: KVCache, new: KVCache, rows) -> KVCache:
  """`new`'s rows written into `cache` at `rows` int32[p] (out of range:
  dropped), in either layout."""
  if cache.per_layer:
    put = lambda c, x: c.at[rows].set(x, mode="drop")
  else:
    put = lambda c, x: c.at[:, rows].set(x, mode="drop")
  return KVCache(
      k=jax.tree.map(put, cache.k, new.k), v=jax.tree.map(put, cache.v, new.v)
  )


def _init(model, config: SamplingConfig, refill: Refill, tp: int, n: int):
  """Empty slots (every one finished) and empty [n, R] outputs."""
  s, g, r = refill.slots, config.num_samples, config.max_new_tokens
  per_layer = model.language_model.unstacked
  zeros = lambda rows, length: KVCache.zeros(
      model.config.text, rows, length, model.dtype, per_layer=per_layer
  )
  length = tp + r if g == 1 else r
  state = dict(
      cache=zeros(s, length),
      kv_mask=jnp.zeros((s, length), jnp.bool_),
      tok=jnp.zeros((s,), jnp.int32),
      step=jnp.zeros((s,), jnp.int32),
      next_pos=jnp.zeros((s,), jnp.int32),
      row=jnp.full((s,), n, jnp.int32),  # n: no row (writes dropped)
      row_id=jnp.zeros((s,), jnp.int32),
      forced=jnp.zeros((s,), jnp.int32),
      done=jnp.ones((s,), jnp.bool_),
      tokens=jnp.full((n, r), config.pad_token, jnp.int32),
      logprobs=jnp.zeros((n, r), jnp.float32),
      mask=jnp.zeros((n, r), jnp.bool_),
      stopped=jnp.zeros((n,), jnp.bool_),
  )
  if g > 1:
    state["prefix"] = zeros(s // g, tp)
    state["prefix_mask"] = jnp.zeros((s // g, tp), jnp.bool_)
  return state


def _record(state, config: SamplingConfig, live, tok, lp, step):
  """Live slots' tokens `tok` (their token number `step`) into the outputs
  and their flags; returns the new state."""
  stop = jnp.asarray(config.stop_tokens or (-1,), jnp.int32)
  n = state["tokens"].shape[0]
  row = jnp.where(live, state["row"], n)
  hit = jnp.isin(tok, stop)
  end = hit | (step == config.max_new_tokens - 1)
  return dict(
      state,
      tokens=state["tokens"].at[row, step].set(tok, mode="drop"),
      logprobs=state["logprobs"].at[row, step].set(lp, mode="drop"),
      mask=state["mask"].at[row, step].set(True, mode="drop"),
      stopped=state["stopped"].at[row].set(hit, mode="drop"),
      tok=jnp.where(live, tok, state["tok"]),
      step=jnp.where(live, step, state["step"]),
      done=jnp.where(live, end, state["done"]),
  )


def _insert(model, state, batch, rng, row_ids, forced, prompts, groups,
            config: SamplingConfig):  # fmt: skip
  """Prompts `prompts` int32[p] of `batch` into slot groups `groups`
  int32[p] (S / G: none), their first tokens chosen."""
  g = config.num_samples
  n_groups = state["done"].shape[0] // g
  valid = groups < n_groups
  take = lambda x, axis=0: jnp.take(x, prompts, axis=axis)
  sub = dict(
      prompt_ids=take(batch["prompt_ids"]),
      prompt_mask=take(batch["prompt_mask"]),
      position_ids=take(batch["position_ids"], 1),
  )
  vision = batch.get("vision")
  if vision is not None:
    vision = jax.tree.map(take, vision)
  free = config.max_new_tokens if g == 1 else 0
  out, kv_mask, next_pos = rollout.prefill(model, sub, vision, free)
  state = dict(state)
  if g == 1:
    state["cache"] = _rows_at(state["cache"], out.cache, groups)
    state["kv_mask"] = state["kv_mask"].at[groups].set(kv_mask, mode="drop")
  else:
    state["prefix"] = _rows_at(state["prefix"], out.cache, groups)
    state["prefix_mask"] = (
        state["prefix_mask"].at[groups].set(sub["prompt_mask"], mode="drop")
    )
  # The group's G slots and queue rows, prompt-major as the outputs.
  j = jnp.arange(g, dtype=jnp.int32)
  slots = (groups[:, None] * g + j).reshape(-1)
  slots = jnp.where(jnp.repeat(valid, g), slots, state["done"].shape[0])
  rows = (prompts[:, None] * g + j).reshape(-1)
  if g > 1:  # fresh response caches: their keys masked off
    state["kv_mask"] = state["kv_mask"].at[slots].set(False, mode="drop")
  put = lambda name, x: state[name].at[slots].set(x, mode="drop")
  state.update(
      row=put("row", rows),
      row_id=put("row_id", row_ids[rows]),
      forced=put("forced", forced[rows]),
      next_pos=put("next_pos", jnp.repeat(next_pos, g)),
      done=put("done", jnp.zeros_like(rows, jnp.bool_)),
  )
  logits = rollout._head_logits(model, out.hidden[:, -1])  # last is real
  keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, row_ids[rows])
  tok, lp = next_tokens(
      keys, 0, jnp.repeat(logits, g, axis=0), config, forced[rows]
  )
  live = jnp.zeros_like(state["done"]).at[slots].set(True, mode="drop")
  full = (
      lambda x: jnp.zeros_like(state["tok"], x.dtype)
      .at[slots]
      .set(x, mode="drop")
  )
  return _record(state, config, live, full(tok), full(lp), 0)


def _window(model, state, rng, config: SamplingConfig, window: int):
  """Up to `window` decoding steps of every unfinished slot."""
  g = config.num_samples
  s = state["done"].shape[0]
  offset = state["kv_mask"].shape[1] - config.max_new_tokens
  shared = {}
  if g > 1:
    shared = dict(
        prefix_cache=state["prefix"], prefix_mask=state["prefix_mask"]
    )
  rows = jnp.arange(s)

  def cond(carry):
    i, state = carry
    return (i < window) & ~jnp.all(state["done"])

  def body(carry):
    i, state = carry
    live = ~state["done"]
    step = state["step"]
    index = offset + step
    kv_mask = state["kv_mask"].at[rows, index].set(True)
    pos = jnp.broadcast_to((state["next_pos"] + step)[None, :, None], (3, s, 1))
    out = model(
        state["tok"][:, None],
        attention_mask=kv_mask,
        position_ids=pos,
        cache=state["cache"],
        cache_index=index,
        return_logits=False,
        **shared,
    )
    logits = rollout._head_logits(model, out.hidden[:, 0])
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, state["row_id"])
    tok, lp = next_tokens(keys, step + 1, logits, config, state["forced"])
    state = dict(state, cache=out.cache, kv_mask=kv_mask)
    return i + 1, _record(state, config, live, tok, lp, step + 1)

  steps, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
  return state, steps


# ---------------------------------------------------------------------------
# Programs (jit caches them by shapes: one per bucket) and the host loop.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def _prepare(graphdef, weights, config: SamplingConfig):
  """The decoding model's (graphdef, weights): see `rollout.decoding_model`
  (run once per call, so the windows gather no weights)."""
  model = rollout.decoding_model(nnx.merge(graphdef, weights), config)
  return nnx.split(model)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "config", "refill", "tp", "n")
)
def _init_program(graphdef, weights, *, config, refill, tp, n):
  return _init(nnx.merge(graphdef, weights), config, refill, tp, n)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "config"), donate_argnames="state"
)
def _insert_program(graphdef, weights, state, batch, rng, row_ids, forced,
                    prompts, groups, *, config):  # fmt: skip
  model = nnx.merge(graphdef, weights)
  return _insert(model, state, batch, rng, row_ids, forced, prompts, groups,
                 config)  # fmt: skip


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "config", "window"),
    donate_argnames="state",
)
def _window_program(graphdef, weights, state, rng, *, config, window):
  return _window(nnx.merge(graphdef, weights), state, rng, config, window)


def _host(x) -> np.ndarray:
  """A (possibly multi-process) array's whole value on every process."""
  if x.is_fully_addressable:
    return np.array(x)  # a copy: the next program donates the buffer
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def insert_sizes(k: int) -> list[int]:
  """`k` free groups as inserts of power-of-two sizes (13: 8, 4, 1), so a
  bucket compiles at most log2(S / G) + 1 insert programs and no insert
  prefills padding."""
  return [1 << b for b in reversed(range(k.bit_length())) if k >> b & 1]


def sample(
    model,
    batch: dict,
    rng: jax.Array,
    config: SamplingConfig,
    refill: Refill,
    row_ids: jax.Array | None = None,
    forced_lengths: Any = None,
    stats: Stats | None = None,
) -> rollout.Rollout:
  """`config.num_samples` responses per prompt of `batch`, by slot refill.

  The same responses as `rollout.sample` (same `rng` and `row_ids`).

  Args:
    model: the policy.
    batch: B prompts (as `rollout.sample`).
    rng: the call's key.
    config: how to sample.
    refill: slots and window.
    row_ids: int32[B * G], each row's random stream (default 0..B*G-1).
    forced_lengths: int32[B * G] or None; see `sampling.next_tokens`.
    stats: filled with what ran, if given.

  Returns:
    a `rollout.Rollout` of B * G rows, prompt-major.
  """
  g = config.num_samples
  refill.check(g)
  b, tp = batch["prompt_ids"].shape
  n, n_groups = b * g, refill.slots // g
  if row_ids is None:
    row_ids = jnp.arange(n, dtype=jnp.int32)
  forced = jnp.zeros((n,), jnp.int32)
  if forced_lengths is not None:
    forced = jnp.asarray(forced_lengths, jnp.int32)
  graphdef, weights = nnx.split(model)
  graphdef, weights = _prepare(graphdef, weights, config)
  state = _init_program(graphdef, weights, config=config, refill=refill,
                        tp=tp, n=n)  # fmt: skip
  stats = stats if stats is not None else Stats()
  stats.slots = refill.slots
  queue, done = 0, np.ones((refill.slots,), bool)
  while True:
    free = np.flatnonzero(done.reshape(n_groups, g).all(1))
    take = free[: b - queue]
    for size in insert_sizes(len(take)):
      prompts = jnp.arange(queue, queue + size, dtype=jnp.int32)
      groups = jnp.asarray(take[:size], jnp.int32)
      state = _insert_program(graphdef, weights, state, batch, rng, row_ids,
                              forced, prompts, groups, config=config)  # fmt: skip
      queue, take = queue + size, take[size:]
      stats.inserts += 1
    state, steps = _window_program(graphdef, weights, state, rng,
                                   config=config, window=refill.window)  # fmt: skip
    done = _host(state["done"])
    stats.windows += 1
    stats.steps += int(_host(steps))
    if queue == b and done.all():
      break
  mask = state["mask"]
  return rollout.Rollout(
      tokens=state["tokens"],
      logprobs=state["logprobs"],
      mask=mask,
      truncated=~state["stopped"],
      lengths=mask.sum(-1).astype(jnp.int32),
  )
