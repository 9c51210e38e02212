"""Fixed-shape batches through buckets, and a resumable shuffled iterator.

XLA compiles once per input shape, so a batch is padded to the smallest
bucket that fits its longest member along each of three axes: prompt
length (left-padded), patches (a multiple of 4: 2x2 patches make one
visual token) and response length (right-padded). The bucket sets are
config; an example larger than every bucket raises a `BucketError` naming
the record (or, with `on_overflow='skip'`, is skipped and counted) and is
never silently cut.

`collate` returns a `Batch`: `arrays`, a pytree of numpy arrays ready for
`jax.device_put`, and `meta`, host-side lists (ids, answers, answer types,
families) of the batch's real rows:

  prompt_ids      int32[B, Tp]  left-padded with the pad id
  prompt_mask     bool[B, Tp]
  position_ids    int32[3, B, Tp]  M-RoPE (`models.inputs.rope_index`)
  rope_deltas     int32[B]
  vision          VisionInputs with P patches (`models.inputs.vision_inputs`)
  cf_vision       the same layout with the counterfactual pixels
  ease_target     float32[B, V]  (V = P / 4; rows sum to 1, 0 on padding)
  focus_target    float32[B, V]
  evidence_mask   bool[B, V]
  has_boxes       bool[B]
  response_ids    int32[B, Tr]  right-padded reference responses (SFT)
  response_mask   bool[B, Tr]
  example_mask    bool[B]  real rows (False: padding of a last batch)

`BatchIterator` draws records in a seeded permutation per epoch, processes
and collates them; its state (`get_state`) is a small JSON-able dict, and
it is a `grain.DatasetIterator`, so `grain.checkpoint.CheckpointSave(it)`
stores it in an Orbax checkpoint beside the model.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from typing import Any, NamedTuple, Sequence

import grain
import numpy as np

from faithful_rl.data.processing import Example
from faithful_rl.models.config import ModelConfig
from faithful_rl.models.inputs import rope_index
from faithful_rl.models.inputs import layout_patches
from faithful_rl.models.inputs import vision_inputs

log = logging.getLogger(__name__)


class BucketError(ValueError):
  """An example longer than every bucket; the message names the record."""


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Allowed padded sizes along each batch axis (ascending)."""

  prompt: tuple[int, ...] = (64, 128, 256)
  patches: tuple[int, ...] = (64, 256, 1024)
  response: tuple[int, ...] = (32, 64, 128)

  def __post_init__(self):
    for name in ("prompt", "patches", "response"):
      values = tuple(sorted(int(v) for v in getattr(self, name)))
      if not values or values[0] <= 0:
        raise ValueError(f"{name} buckets must be positive: {values}")
      object.__setattr__(self, name, values)
    if any(p % 4 for p in self.patches):
      raise ValueError(f"patch buckets must be multiples of 4: {self.patches}")


def bucket_for(n: int, buckets: Sequence[int], what: str, record_id=None):
  """The smallest bucket >= n; BucketError naming the record otherwise."""
  for b in buckets:
    if n <= b:
      return b
  who = f"record {record_id!r}: " if record_id is not None else ""
  raise BucketError(
      f"{who}{what} of {n} exceeds the largest bucket {buckets[-1]}"
      f" (buckets {tuple(buckets)}); add a larger bucket, shrink the input"
      " (e.g. max_pixels) or set on_overflow='skip'"
  )


def patch_slots(ex: Example, vision_config) -> int:
  """The patch slots `ex`'s images take in the vision layout (>= patches:
  partial attention windows are padded, `models.inputs.layout_patches`)."""
  return layout_patches(ex.grids, vision_config)


def check_fits(
    ex: Example, buckets: Buckets, vision_config, truncate_response=False
):
  """Raises BucketError when `ex` fits no bucket along some axis."""
  bucket_for(len(ex.prompt_ids), buckets.prompt, "prompt length", ex.id)
  bucket_for(
      patch_slots(ex, vision_config), buckets.patches, "image patches", ex.id
  )
  if not truncate_response:
    bucket_for(len(ex.response_ids), buckets.response, "response length", ex.id)


class Batch(NamedTuple):
  """`arrays`: the device pytree; `meta`: host lists of the real rows."""

  arrays: dict[str, Any]
  meta: dict[str, Any]


def collate(
    examples: Sequence[Example],
    *,
    model_config: ModelConfig,
    buckets: Buckets = Buckets(),
    batch_size: int | None = None,
    pad_id: int | None = None,
    truncate_response: bool = False,
) -> Batch:
  """Pads processed examples into one fixed-shape `Batch`.

  Args:
    examples: the batch's examples (at most `batch_size`; further rows are
      padding with `example_mask` False).
    model_config: gives the image token id and the vision layout.
    buckets: the allowed padded sizes.
    batch_size: B; default len(examples).
    pad_id: prompt/response padding id; default the model's pad token
      (else 0). Padding is masked, so its value only matters for safety.
    truncate_response: cut responses longer than the largest bucket
      (counted in meta['truncated_responses']) instead of raising.

  Returns:
    A `Batch` (see the module docstring for the arrays).
  """
  n = len(examples)
  b = batch_size or n
  if n == 0 or n > b:
    raise ValueError(f"{n} examples for a batch of {b}")
  if pad_id is None:
    pad_id = model_config.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
  for ex in examples:
    check_fits(ex, buckets, model_config.vision, truncate_response)
  tp = bucket_for(max(len(e.prompt_ids) for e in examples), buckets.prompt, "")
  p = bucket_for(
      max(patch_slots(e, model_config.vision) for e in examples),
      buckets.patches,
      "",
  )
  resp_len = max(len(e.response_ids) for e in examples)
  tr = min(buckets.response[-1], resp_len) if truncate_response else resp_len
  tr = bucket_for(tr, buckets.response, "")
  unit = model_config.vision.merge_unit
  v = p // unit

  prompt_ids = np.full((b, tp), pad_id, np.int32)
  prompt_mask = np.zeros((b, tp), bool)
  response_ids = np.full((b, tr), pad_id, np.int32)
  response_mask = np.zeros((b, tr), bool)
  ease = np.zeros((b, v), np.float32)
  focus = np.zeros((b, v), np.float32)
  evidence = np.zeros((b, v), bool)
  has_boxes = np.zeros((b,), bool)
  example_mask = np.arange(b) < n
  dim = model_config.vision.patch_dim
  cf_pix = np.zeros((b, p, dim), np.float32)
  pix, grids = [], []
  truncated = 0
  for i, ex in enumerate(examples):
    lp = len(ex.prompt_ids)
    prompt_ids[i, tp - lp :] = ex.prompt_ids
    prompt_mask[i, tp - lp :] = True
    resp = ex.response_ids[:tr]
    truncated += len(resp) < len(ex.response_ids)
    response_ids[i, : len(resp)] = resp
    response_mask[i, : len(resp)] = True
    nv = ex.num_visual_tokens
    ease[i, :nv] = ex.ease_target
    focus[i, :nv] = ex.focus_target
    evidence[i, :nv] = ex.evidence_mask
    has_boxes[i] = ex.has_boxes
    cf_pix[i, : ex.num_patches] = ex.cf_pixel_values
    pix.append(ex.pixel_values)
    grids.append(ex.grids)
  for _ in range(n, b):
    pix.append(np.zeros((0, dim), np.float32))
    grids.append([])
  positions, deltas = rope_index(prompt_ids, prompt_mask, grids, model_config)
  vision = vision_inputs(pix, grids, p, model_config.vision)
  arrays = dict(
      prompt_ids=prompt_ids,
      prompt_mask=prompt_mask,
      position_ids=positions,
      rope_deltas=deltas,
      vision=vision,
      cf_vision=dataclasses.replace(vision, pixel_values=cf_pix),
      ease_target=ease,
      focus_target=focus,
      evidence_mask=evidence,
      has_boxes=has_boxes,
      response_ids=response_ids,
      response_mask=response_mask,
      example_mask=example_mask,
  )
  meta = dict(
      ids=[e.id for e in examples],
      answers=[e.answer for e in examples],
      answer_types=[e.answer_type for e in examples],
      families=[e.family for e in examples],
      truncated_responses=int(truncated),
  )
  return Batch(arrays, meta)


class BatchIterator(grain.DatasetIterator):
  """Seeded, resumable iterator of collated batches over a record source.

  Records are visited epoch by epoch in `default_rng([seed, epoch])`
  permutations (or in order when `shuffle=False`); a batch may span an
  epoch boundary. With `shard=(i, k)` this process takes every k-th record
  of each permutation, starting at i (one shard per data-parallel host).

  State: {"seed", "epoch", "position", "num_records", "shard", "skipped"}
  where (epoch, position) is the next record to read: restoring it with
  `set_state` continues with exactly the same batches.
  """

  def __init__(
      self,
      source,
      processor,
      *,
      batch_size: int,
      model_config: ModelConfig,
      buckets: Buckets = Buckets(),
      seed: int = 0,
      shuffle: bool = True,
      num_epochs: int | None = None,
      drop_remainder: bool = True,
      on_overflow: str = "error",
      truncate_response: bool = False,
      shard: tuple[int, int] = (0, 1),
      num_threads: int = 0,
  ):
    """See the class docstring.

    Args:
      source: random-access records (len and [i]), e.g. a tfds data source.
      processor: a `Processor` (record -> Example).
      batch_size: B.
      model_config: the model's config (token ids, vision layout).
      buckets: padded sizes.
      seed: shuffling seed.
      shuffle: permute each epoch (else read in order).
      num_epochs: epochs to read; None for endless.
      drop_remainder: drop the last incomplete batch (else pad it, with
        `example_mask` False on the padding rows).
      on_overflow: 'error' (raise BucketError naming the record) or 'skip'
        (skip it and count it in the state's "skipped").
      truncate_response: cut too long reference responses (see `collate`).
      shard: (index, count) of this process's shard of every epoch.
      num_threads: threads that process a batch's records (0: inline).
    """
    super().__init__()
    if on_overflow not in ("error", "skip"):
      raise ValueError(f"on_overflow={on_overflow!r} not in ('error', 'skip')")
    if not 0 <= shard[0] < shard[1]:
      raise ValueError(f"bad shard {shard}")
    self.source, self.processor = source, processor
    self.batch_size, self.model_config = batch_size, model_config
    self.buckets, self.shuffle = buckets, shuffle
    self.num_epochs, self.drop_remainder = num_epochs, drop_remainder
    self.on_overflow, self.truncate_response = on_overflow, truncate_response
    self.shard = (int(shard[0]), int(shard[1]))
    self.num_records = len(source)
    if self.num_records == 0:
      raise ValueError("the source is empty")
    self._pool = (
        concurrent.futures.ThreadPoolExecutor(num_threads)
        if num_threads > 0
        else None
    )
    self._seed, self._epoch, self._position, self._skipped = seed, 0, 0, 0
    self._order_cache: tuple[int, np.ndarray] | None = None

  # -- order ----------------------------------------------------------------

  def _order(self, epoch: int) -> np.ndarray:
    if self._order_cache is None or self._order_cache[0] != epoch:
      if self.shuffle:
        order = np.random.default_rng([self._seed, epoch]).permutation(
            self.num_records
        )
      else:
        order = np.arange(self.num_records)
      self._order_cache = (epoch, order[self.shard[0] :: self.shard[1]])
    return self._order_cache[1]

  def _next_indices(self, k: int) -> list[int]:
    """Up to k record indices from the current position (advancing it)."""
    out = []
    while len(out) < k:
      if self.num_epochs is not None and self._epoch >= self.num_epochs:
        break
      order = self._order(self._epoch)
      take = order[self._position : self._position + k - len(out)]
      out.extend(int(i) for i in take)
      self._position += len(take)
      if self._position >= len(order):
        self._epoch, self._position = self._epoch + 1, 0
    return out

  # -- examples -------------------------------------------------------------

  def _process(self, indices: list[int]) -> list[Example]:
    records = [self.source[i] for i in indices]
    if self._pool is not None:
      return list(self._pool.map(self.processor, records))
    return [self.processor(r) for r in records]

  def _keep(self, ex: Example) -> bool:
    try:
      check_fits(
          ex, self.buckets, self.model_config.vision, self.truncate_response
      )
    except BucketError as e:
      if self.on_overflow == "error":
        raise
      self._skipped += 1
      log.warning("skipping (%d so far): %s", self._skipped, e)
      return False
    return True

  def next_examples(self, k: int) -> list[Example]:
    """Up to k processed examples that fit the buckets (fewer at the end)."""
    examples: list[Example] = []
    while len(examples) < k:
      indices = self._next_indices(k - len(examples))
      if not indices:
        break
      examples += [ex for ex in self._process(indices) if self._keep(ex)]
    return examples

  def __next__(self) -> Batch:
    examples = self.next_examples(self.batch_size)
    if not examples or (
        len(examples) < self.batch_size and self.drop_remainder
    ):
      raise StopIteration
    return collate(
        examples,
        model_config=self.model_config,
        buckets=self.buckets,
        batch_size=self.batch_size,
        truncate_response=self.truncate_response,
    )

  # -- state ----------------------------------------------------------------

  def get_state(self) -> dict[str, Any]:
    return {
        "seed": int(self._seed),
        "epoch": int(self._epoch),
        "position": int(self._position),
        "num_records": int(self.num_records),
        "shard": list(self.shard),
        "skipped": int(self._skipped),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if int(state["num_records"]) != self.num_records:
      raise ValueError(
          f"the state is for {state['num_records']} records, the source has"
          f" {self.num_records}"
      )
    if tuple(state["shard"]) != self.shard:
      raise ValueError(f"the state is for shard {state['shard']}")
    self._seed = int(state["seed"])
    self._epoch = int(state["epoch"])
    self._position = int(state["position"])
    self._skipped = int(state["skipped"])
    self._order_cache = None

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=False)
      self._pool = None
    super().close()


class Prefetch:
  """Prepares the next batches of an iterator in a background thread.

  Overlaps record decoding and image processing with the device step. Its
  state is the consumer's: `get_state()` is the wrapped iterator's state
  right after the last batch handed out, so checkpoints resume exactly
  where training was, whatever the thread had read ahead.
  """

  def __init__(self, iterator: BatchIterator, depth: int = 2):
    import queue  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top

    self._queue_cls, self._thread_cls = queue.Queue, threading.Thread
    self._it, self._depth = iterator, depth
    self._state = iterator.get_state()
    self._start()

  def _start(self):
    import threading  # pylint: disable=g-import-not-at-top

    self._q = self._queue_cls(self._depth)
    self._stop = threading.Event()

    def produce(q=self._q, stop=self._stop):
      while not stop.is_set():
        try:
          item = (next(self._it), self._it.get_state(), None)
        except Exception as e:  # pylint: disable=broad-except
          item = (None, None, e)  # StopIteration and errors re-raised
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except Exception:  # pylint: disable=broad-except  # queue.Full
            continue
        if item[2] is not None:
          return

    self._thread = self._thread_cls(target=produce, daemon=True)
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    batch, state, error = self._q.get()
    if error is not None:
      raise error
    self._state = state
    return batch

  def _halt(self):
    self._stop.set()
    self._thread.join()

  def get_state(self) -> dict[str, Any]:
    return dict(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    self._halt()
    self._it.set_state(state)
    self._state = self._it.get_state()
    self._start()

  def close(self) -> None:
    self._halt()
    self._it.close()
