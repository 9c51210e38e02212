"""One device mesh (data, fsdp, tensor) and partition rules.

Parameters are sharded by regex rules over their path (`a/b/kernel`), in
the style of big_vision: the first rule that matches gives a
PartitionSpec; a mesh axis whose size does not divide the dimension is
dropped for that parameter (it stays replicated along it), so the same
rules serve 1 CPU, 8 fake CPU devices, a GPU node or a TPU pod. Batches
shard their leading axis over (data, fsdp).

Multi-host: call `jax.distributed.initialize()` before building the mesh
(`config.distributed.enabled=True` does it in train.py); the functions at
the end of this file move batches between processes and the mesh.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# Linear kernels are [in, out]: column-parallel layers shard `out` over
# tensor, row-parallel ones shard `in`; fsdp takes the other dimension.
DEFAULT_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "tensor")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|qkv|mlp_0)/kernel$",
     P("fsdp", "tensor")),
    (r"(o_proj|down_proj|proj|mlp_2)/kernel$", P("tensor", "fsdp")),
    (r"patch_embed/kernel$", P("fsdp", "tensor")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|qkv|mlp_0)/bias$",
     P("tensor")),
    (r".*", P()),
)  # fmt: skip


# The same rules without fsdp: what a device holds of each weight when the
# sampler gathers them once per call (`gather_fsdp`).
SAMPLER_RULES: tuple[tuple[str, P], ...] = tuple(
    (pattern, P(*(None if axis == "fsdp" else axis for axis in spec)))
    for pattern, spec in DEFAULT_RULES
)


def make_mesh(shape: dict[str, int] | None = None, devices=None) -> Mesh:
  """A mesh over all devices; one axis size may be -1 (the rest).

  Args:
    shape: {"data": d, "fsdp": f, "tensor": t}; default all devices on fsdp.
    devices: default `jax.devices()`.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = dict(shape or {"data": 1, "fsdp": -1, "tensor": 1})
  sizes = [int(shape.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1: {shape}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {shape} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
        f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices,"
        f" there are {len(devices)}"
    )
  return jax.make_mesh(
      tuple(sizes),
      AXES,
      axis_types=(AxisType.Auto,) * len(AXES),
      devices=devices,
  )


def path_str(path: Sequence[Any]) -> str:
  parts = []
  for p in path:
    p = getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))
    parts.append(str(p))
  return "/".join(parts)


def spec_for(
    path: str, shape: tuple[int, ...], mesh: Mesh, rules=DEFAULT_RULES
) -> P:
  """The PartitionSpec of one parameter (axes that do not divide dropped)."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      break
  else:
    return P()
  if len(spec) > len(shape):
    spec = P(*spec[-len(shape) :]) if shape else P()
  elif len(spec) < len(shape):
    # Stacked layers ([L, ...]): the rule names the trailing axes; the
    # layer axis stays whole, so each scan step finds its layer locally.
    spec = P(*((None,) * (len(shape) - len(spec)) + tuple(spec)))
  out = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * len(shape)):
    names = (axis,) if isinstance(axis, str) else tuple(axis or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append(axis if names and dim % size == 0 and size > 1 else None)
  return P(*out)


def fsdp_sharded() -> bool:
  """Whether the current mesh (`jax.set_mesh`) shards parameters over an
  fsdp axis of more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.shape.get("fsdp", 1) > 1


def gather_fsdp(tree, rules=SAMPLER_RULES):
  """`tree`'s parameters whole along fsdp (and data) on every device, still
  sharded along tensor: one all-gather of each, inside a jitted program
  under a mesh (`jax.set_mesh`). The identity without a mesh.

  The rollout does this once per call (`SamplingConfig.gather_weights`):
  with the weights left FSDP-sharded, every decoding step would all-gather
  every layer's weights again.

  Each leaf is first pinned to its training layout (`DEFAULT_RULES`), then
  gathered. Without the pin, the partitioner meets a replicated cast of a
  sharded parameter (`in_compute_dtype` runs just before) and gathers the
  float32 masters before casting: twice the bytes over the links, and a
  float32 copy of the whole model held beside the bf16 one.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return tree

  def one(path, x):
    name = path_str(path).removesuffix("/value")  # an nnx Variable's leaf
    shape = tuple(x.shape)
    x = jax.lax.with_sharding_constraint(x, spec_for(name, shape, mesh))
    return jax.lax.with_sharding_constraint(
        x, spec_for(name, shape, mesh, rules)
    )

  return jax.tree_util.tree_map_with_path(one, tree)


def tree_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a pytree of arrays/ShapeDtypeStructs, by path."""

  def one(path, leaf):
    return NamedSharding(
        mesh, spec_for(path_str(path), tuple(leaf.shape), mesh, rules)
    )

  return jax.tree_util.tree_map_with_path(one, tree)


def param_sharding_fn(mesh: Mesh, rules=DEFAULT_RULES):
  """(path, shape) -> NamedSharding, for `models.from_pretrained`."""
  return lambda path, shape: NamedSharding(
      mesh, spec_for(path_str(path), tuple(shape), mesh, rules)
  )


def batch_sharding(mesh: Mesh, tree):
  """Leading axis over (data, fsdp) where it divides; else replicated."""
  n = mesh.shape["data"] * mesh.shape["fsdp"]

  def one(leaf):
    shape = np.shape(leaf)
    if shape and shape[0] % n == 0 and n > 1:
      return NamedSharding(mesh, P(BATCH))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree)


def put_batch(mesh: Mesh, tree):
  """Places a host batch on the mesh (leading axis data-parallel)."""
  return jax.device_put(tree, batch_sharding(mesh, tree))


# ---------------------------------------------------------------------------
# Several processes: each holds its share of the batch.
#
# A batch's leading axis is split over processes in contiguous blocks, in
# process order (process p holds rows [p * n / P, (p + 1) * n / P)): the
# layout `jax.make_array_from_process_local_data` gives over a mesh whose
# batch axes list the processes' devices in order. With one process these
# are plain `device_put` / `device_get`.
# ---------------------------------------------------------------------------


def global_batch(mesh: Mesh, tree):
  """Global arrays from this process's rows of a batch (host arrays).

  The leading axis is sharded over (data, fsdp) where the global size
  divides; otherwise the array is replicated (the processes' rows are
  all-gathered first, so every process must call this together).
  """
  procs = jax.process_count()
  if procs == 1:
    return put_batch(mesh, tree)
  n_dev = mesh.shape["data"] * mesh.shape["fsdp"]

  def one(x):
    x = np.asarray(x)
    shape = (x.shape[0] * procs,) + x.shape[1:]
    if shape[0] % n_dev == 0 and n_dev > 1:
      sh = NamedSharding(mesh, P(BATCH))
      return jax.make_array_from_process_local_data(sh, x, shape)
    return replicated(mesh, allgather(x))

  return jax.tree.map(one, tree)


def replicated(mesh: Mesh, tree):
  """Arrays equal on every process, replicated over the mesh."""
  sh = NamedSharding(mesh, P())

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

  return jax.tree.map(one, tree)


def local_rows(x, mesh: Mesh | None = None) -> np.ndarray:
  """This process's block of rows of a global array (host numpy).

  With several processes an array not laid out by rows (see above) is
  first re-laid out on `mesh` (a collective: every process calls this).
  """
  procs = jax.process_count()
  if procs == 1:
    return np.asarray(jax.device_get(x))
  p, n = jax.process_index(), x.shape[0]
  if n % procs:
    raise ValueError(f"{n} rows do not split over {procs} processes")
  want = batch_sharding(mesh, x) if mesh is not None else x.sharding
  if mesh is not None and not x.sharding.is_equivalent_to(want, x.ndim):
    x = jax.jit(lambda a: a, out_shardings=want)(x)
  k = n // procs
  if x.sharding.is_fully_replicated:
    return np.asarray(x.addressable_data(0))[p * k : (p + 1) * k]
  blocks = {}
  for shard in x.addressable_shards:
    if any(s != slice(None) for s in shard.index[1:]):
      raise ValueError(f"rows of {x.sharding} are split along other axes")
    blocks.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
  out = np.concatenate([blocks[s] for s in sorted(blocks)])
  if min(blocks) != p * k or out.shape[0] != k:
    raise ValueError(
        f"process {p} holds rows from {min(blocks)} ({out.shape[0]} rows),"
        f" not its block [{p * k}, {(p + 1) * k})"
    )
  return out


def allgather(x) -> np.ndarray:
  """Every process's host array, concatenated along axis 0 in process order."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any (a collective)."""
  return bool(allgather(np.asarray([bool(flag)])).any())


def stacked_shardings(mesh: Mesh, tree):
  """Shardings of a [M, rows, ...] tree: axis 1 over (data, fsdp) if it
  divides, else replicated (the M axis is scanned, never sharded)."""
  n = mesh.shape["data"] * mesh.shape["fsdp"]

  def one(leaf):
    shape = tuple(leaf.shape)
    if len(shape) >= 2 and shape[1] % n == 0 and n > 1:
      return NamedSharding(mesh, P(None, BATCH))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree)
