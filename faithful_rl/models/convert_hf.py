"""Hugging Face checkpoints <-> Flax NNX parameters, tensor by tensor.

The mapping is a pure function of the family (`families.Family`: the
model class, the HF prefix of each top-level module, extra stacked modules
and layouts) and the parameter path: HF `Linear` weights are [out, in] and
ours [in, out]; the patch Conv3d (stride = kernel) is a linear map of the
flattened (channel, time, row, col) patch; norms, biases and embeddings
are copied. Both HF key layouts
are read: the flat one (`model.layers.*`, `visual.*`) and the nested one
(`model.language_model.*`, `model.visual.*`). We write each family's
published layout, which is also what `transformers` writes: flat for
Qwen2.5-VL, nested for Qwen3-VL.

Loading never holds two copies of the model: the abstract model comes from
`nnx.eval_shape`, then each tensor is read from a memory-mapped shard,
converted, placed on its device (with its sharding, if given), and dropped;
a shard is closed before the next is opened.

CLI (an Orbax copy restores faster and sharded):
  python -m faithful_rl.models.convert_hf to-orbax HF_DIR ORBAX_DIR
  python -m faithful_rl.models.convert_hf to-hf ORBAX_DIR HF_DIR

A training run's checkpoints are exported by `python -m faithful_rl.export`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from faithful_rl.models import families
from faithful_rl.models import safetensors_io
from faithful_rl.models.config import CheckpointError
from faithful_rl.models.config import ModelConfig
from faithful_rl.models.config import read_config

Path = tuple[Any, ...]
ShardingFn = Callable[[Path, tuple[int, ...]], Any]

# Files of a HF model folder that are not weights and travel with it.
AUX_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


def model_class(config: ModelConfig):
  """The model class of `config.family` (`families.Family.model_class`)."""
  return families.get(config.family).model_class


# ---------------------------------------------------------------------------
# The name mapping.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorLayout:
  """How one kind of parameter differs from its HF tensor.

  to_hf(x, config): one layer's array of ours -> the HF tensor;
  from_hf(x): the HF tensor -> one layer's array of ours;
  hf_shape(shape, config): one layer's shape of ours -> the HF shape.
  """

  to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]
  from_hf: Callable[[np.ndarray], np.ndarray]
  hf_shape: Callable[[tuple[int, ...], ModelConfig], tuple[int, ...]]


def _patch_shape(config: ModelConfig) -> tuple[int, ...]:
  v = config.vision
  return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size,
          v.patch_size)  # fmt: skip


# The patch Conv3d (stride = kernel) is a linear map of the flattened patch.
PATCH_EMBED = TensorLayout(
    to_hf=lambda x, config: x.T.reshape(_patch_shape(config)),
    from_hf=lambda x: x.reshape(x.shape[0], -1).T,
    hf_shape=lambda shape, config: _patch_shape(config),
)
# HF `Linear` weights are [out, in], ours [in, out].
KERNEL = TensorLayout(
    to_hf=lambda x, config: x.T,
    from_hf=lambda x: x.T,
    hf_shape=lambda shape, config: tuple(reversed(shape)),
)
SAME = TensorLayout(
    to_hf=lambda x, config: x,
    from_hf=lambda x: x,
    hf_shape=lambda shape, config: tuple(shape),
)


def tensor_layout(path: Path, family: str = "qwen2_5_vl") -> TensorLayout:
  """The family's layout of the parameter at `path`, else the generic one."""
  own = families.get(family).layout
  found = own(path) if own else None
  if found is not None:
    return found
  if tuple(str(p) for p in path[-2:]) == ("patch_embed", "kernel"):
    return PATCH_EMBED
  return KERNEL if str(path[-1]) == "kernel" else SAME


def stacked_axis(path: Path) -> int | None:
  """Where the layer number goes in the HF name, or None (not stacked)."""
  parts = tuple(str(p) for p in path)
  stacked = families.stacked_paths()
  for i in range(len(parts) - 1):
    # A layer list (Qwen3.5's two kinds of layer) has the number already.
    listed = i + 2 < len(path) and isinstance(path[i + 2], int)
    if parts[i : i + 2] in stacked and not listed:
      return i + 2
  return None


def hf_name(
    path: Path, layer: int | None = None, family: str = "qwen2_5_vl"
) -> str:
  """Our parameter path (+ its layer, if stacked) -> the published name."""
  parts = [str(p) for p in path]
  at = stacked_axis(path)
  if at is not None:
    if layer is None:
      raise ValueError(f"{'/'.join(parts)} is stacked: name a layer")
    parts.insert(at, str(layer))
  parts[0] = families.get(family).roots[parts[0]]
  if parts[-2] == "patch_embed":
    parts[-1] = "proj." + ("bias" if parts[-1] == "bias" else "weight")
  elif parts[-1] in ("kernel", "embedding"):
    parts[-1] = "weight"
  parts = [re.sub(r"^mlp_(\d+)$", r"mlp.\1", p) for p in parts]
  return ".".join(parts)


def hf_names(
    path: Path, shape: tuple[int, ...], family: str = "qwen2_5_vl"
) -> list[str]:
  """Every HF tensor name of one of our parameters (one per layer)."""
  if stacked_axis(path) is None:
    return [hf_name(path, family=family)]
  return [hf_name(path, i, family) for i in range(shape[0])]


def normalize_hf_name(name: str, family: str = "qwen2_5_vl") -> str:
  """Either HF layout -> the family's published layout."""
  for prefix in ("model.language_model.", "model.visual.", "model.", "visual."):
    if name.startswith(prefix):
      rest = name[len(prefix) :]
      module = "visual" if "visual" in prefix else "language_model"
      return f"{families.get(family).roots[module]}.{rest}"
  return name


def to_hf_layout(path: Path, x: np.ndarray, config: ModelConfig) -> np.ndarray:
  """One layer's array of ours -> the HF tensor."""
  return tensor_layout(path, config.family).to_hf(x, config)


def from_hf_layout(
    path: Path, x: np.ndarray, family: str = "qwen2_5_vl"
) -> np.ndarray:
  """The HF tensor -> one layer's array of ours."""
  return tensor_layout(path, family).from_hf(x)


def hf_shape(path: Path, shape: tuple[int, ...], config) -> tuple[int, ...]:
  """The HF tensor shape of one layer of a parameter of `shape`."""
  if stacked_axis(path) is not None:
    shape = shape[1:]
  return tensor_layout(path, config.family).hf_shape(tuple(shape), config)


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------


def weight_files(hf_dir: str) -> dict[str, list[str]]:
  """Shard file -> tensor names it should hold; checks every shard exists."""
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  single = os.path.join(hf_dir, "model.safetensors")
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
      raise CheckpointError(f"{index}: unreadable index: {e}") from e
    files: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
      files.setdefault(fname, []).append(name)
    for fname, names in files.items():
      path = os.path.join(hf_dir, fname)
      if not os.path.isfile(path):
        raise CheckpointError(
            f"{path}: shard listed in {index} is missing (it holds"
            f" {len(names)} tensors, e.g. {names[0]!r})"
        )
    return files
  if os.path.isfile(single):
    return {"model.safetensors": []}
  raise CheckpointError(
      f"{hf_dir}: no model.safetensors or model.safetensors.index.json"
  )


def model_options(
    *, param_dtype=None, remat="none", attention="auto", scan_layers=True
) -> dict[str, Any]:
  """The constructor options every model class takes besides its config."""
  return dict(
      param_dtype=param_dtype,
      remat=remat,
      attention=attention,
      scan_layers=scan_layers,
  )


def options_of(model: nnx.Module) -> dict[str, Any]:
  """The constructor options `model` was built with."""
  return model_options(
      param_dtype=model.param_dtype,
      remat=model.remat,
      attention=model.attention,
      scan_layers=model.scan_layers,
  )


def abstract_model(config: ModelConfig, dtype=jnp.float32, **options):
  cls = model_class(config)
  opts = model_options(**options)
  return nnx.eval_shape(
      lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0), **opts)
  )


class _Tensors:
  """Where each HF tensor of a checkpoint lies; shards opened lazily."""

  def __init__(self, hf_dir: str):
    self.hf_dir = hf_dir
    self.where: dict[str, tuple[str, str]] = {}  # name -> (file, raw name)
    self._open: dict[str, safetensors_io.SafetensorsFile] = {}

  def file(self, fname: str) -> safetensors_io.SafetensorsFile:
    if fname not in self._open:
      self._open[fname] = safetensors_io.SafetensorsFile(
          os.path.join(self.hf_dir, fname)
      )
    return self._open[fname]

  def get(self, name: str) -> np.ndarray:
    fname, raw = self.where[name]
    return self.file(fname).get(raw)

  def close(self):
    for f in self._open.values():
      f.close()
    self._open.clear()


def from_pretrained(
    hf_dir: str,
    dtype=jnp.float32,
    *,
    sharding: ShardingFn | None = None,
    **options,
) -> nnx.Module:
  """Loads a local HF Qwen-VL folder (family read from config.json).

  Args:
    hf_dir: folder with config.json and *.safetensors (sharded or not).
    dtype: compute dtype (e.g. jnp.bfloat16).
    sharding: optional (path, shape) -> jax.sharding.Sharding, to place
      each parameter directly where it lives: every device (every host)
      reads only its own slice of each tensor from the memory-mapped files.
    **options: `param_dtype` (storage dtype, default `dtype`), `remat`,
      `attention`, `scan_layers` (see the model class).

  Returns:
    The model, with `model.config` read from `config.json`.
  """
  config = read_config(hf_dir)
  graphdef, state = nnx.split(abstract_model(config, dtype, **options))
  flat = dict(nnx.to_flat_state(state))
  expected = {}
  for path, var in flat.items():
    for name in hf_names(path, var.shape, config.family):
      expected[name] = path
  tied = config.text.tie_word_embeddings
  tensors = _Tensors(hf_dir)
  skip = families.get(config.family).skip_hf
  unexpected = []
  try:
    for fname in sorted(weight_files(hf_dir)):
      f = tensors.file(fname)
      fpath = os.path.join(hf_dir, fname)
      for raw in f.keys():
        name = normalize_hf_name(raw, config.family)
        if skip and name.startswith(skip):
          continue  # published, not part of the model (an MTP head)
        if name not in expected:
          if tied and name == "lm_head.weight":
            continue  # the tied head is the embedding
          unexpected.append(f"{raw} ({fname})")
          continue
        path = expected[name]
        want = hf_shape(path, flat[path].shape, config)
        if f.shape(raw) != want:
          raise CheckpointError(
              f"{fpath}: tensor {raw!r} has shape {list(f.shape(raw))},"
              f" expected {list(want)} from config.json"
          )
        tensors.where[name] = (fname, raw)
    if unexpected:
      raise CheckpointError(
          f"{hf_dir}: {len(unexpected)} tensors not part of a"
          f" {config.family} model: {', '.join(unexpected[:5])}"
      )
    missing = [name for name in expected if name not in tensors.where]
    if missing:
      raise CheckpointError(
          f"{hf_dir}: {len(missing)} tensors missing from the checkpoint:"
          f" {', '.join(missing[:5])}"
      )
    for path, var in flat.items():
      var.value = _load_param(tensors, path, var, sharding, config.family)
  finally:
    tensors.close()
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _load_param(
    tensors: _Tensors, path: Path, var, sharding, family: str
) -> jax.Array:
  """One parameter, each device's slice read from the checkpoint."""
  names = hf_names(path, var.shape, family)
  stacked = stacked_axis(path) is not None
  dtype = var.dtype

  def read(index) -> np.ndarray:
    # Private copies: nothing may keep a view of the memory-mapped file.
    if not stacked:
      return np.array(from_hf_layout(path, tensors.get(names[0]), family)[index],
                      dtype)  # fmt: skip
    layers = range(*index[0].indices(len(names)))
    rest = tuple(index[1:])
    return np.stack([
        np.array(
            from_hf_layout(path, tensors.get(names[i]), family)[rest], dtype
        )
        for i in layers
    ])

  shape = tuple(var.shape)
  full = tuple(slice(None) for _ in shape)
  shard = sharding(path, shape) if sharding else None
  if shard is None:
    return jnp.asarray(read(full))
  return jax.make_array_from_callback(shape, shard, lambda idx: read(idx))


# ---------------------------------------------------------------------------
# Saving.
# ---------------------------------------------------------------------------


def save_pretrained(
    model: nnx.Module,
    out_dir: str,
    *,
    dtype=jnp.bfloat16,
    max_shard_bytes: int = 2 * 1024**3,
    copy_files_from: str | None = None,
) -> list[str]:
  """Writes `model` as a HF folder that `transformers` loads.

  Args:
    model: a model from this package.
    out_dir: destination folder (created).
    dtype: the dtype to write (bf16 by default, as published checkpoints
      are; None keeps the parameters' own dtype, e.g. float32 masters).
    max_shard_bytes: shard size; above one shard an index file is written.
    copy_files_from: a HF folder whose tokenizer/processor files to copy.

  Returns:
    The weight files written.
  """
  config: ModelConfig = model.config
  os.makedirs(out_dir, exist_ok=True)
  flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  items = []  # (name, path, layer or None, var, bytes): one per HF tensor
  for path, var in flat:
    stacked = stacked_axis(path) is not None
    per = var.shape[1:] if stacked else var.shape
    nbytes = int(np.prod(per)) * np.dtype(dtype or var.dtype).itemsize
    for i, name in enumerate(hf_names(path, var.shape, config.family)):
      items.append((name, path, i if stacked else None, var, nbytes))
  shards, current, size = [], [], 0
  for item in items:
    if current and size + item[-1] > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(item)
    size += item[-1]
  if current:
    shards.append(current)
  names = (
      ["model.safetensors"]
      if len(shards) == 1
      else [
          f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
          for i in range(len(shards))
      ]
  )
  weight_map, total = {}, 0
  for fname, shard in zip(names, shards):
    tensors = []
    for name, path, layer, var, _ in shard:
      value = var[...] if layer is None else var[...][layer]
      arr = np.asarray(jax.device_get(value))
      if dtype is not None:
        arr = arr.astype(dtype)
      tensors.append((name, np.ascontiguousarray(to_hf_layout(path, arr,
                                                              config))))  # fmt: skip
      weight_map[name] = fname
      total += arr.nbytes
    safetensors_io.save_file(
        tensors, os.path.join(out_dir, fname), metadata={"format": "pt"}
    )
    del tensors
  index = os.path.join(out_dir, "model.safetensors.index.json")
  if len(shards) > 1:
    with open(index, "w") as f:
      json.dump(
          {"metadata": {"total_size": total}, "weight_map": weight_map},
          f,
          indent=2,
      )
  elif os.path.exists(index):
    os.remove(index)
  hf_config = hf_config_of(config)
  hf_config.dtype = str(np.dtype(dtype or model.param_dtype).name)
  hf_config.to_json_file(os.path.join(out_dir, "config.json"))
  if copy_files_from:
    copy_aux_files(copy_files_from, out_dir)
  return names


def hf_config_of(config: ModelConfig):
  """`config.to_hf()` naming the family's model class under
  `architectures`, as transformers writes it (vLLM picks the model by it)."""
  hf_config = config.to_hf()
  hf_config.architectures = [families.get(config.family).hf_architecture]
  return hf_config


def copy_aux_files(src: str, dst: str) -> None:
  if os.path.abspath(src) == os.path.abspath(dst):
    return
  for fname in AUX_FILES:
    if os.path.isfile(os.path.join(src, fname)):
      shutil.copy2(os.path.join(src, fname), os.path.join(dst, fname))


# ---------------------------------------------------------------------------
# Orbax.
# ---------------------------------------------------------------------------


def save_orbax(model: nnx.Module, out_dir: str, hf_dir: str | None = None):
  """Parameters to an Orbax checkpoint, with config/tokenizer files beside."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(out_dir, "params"), state, force=True)
  hf_config_of(model.config).to_json_file(os.path.join(out_dir, "config.json"))
  if hf_dir:
    copy_aux_files(hf_dir, out_dir)


def load_orbax(
    orbax_dir: str,
    dtype=jnp.float32,
    *,
    sharding: ShardingFn | None = None,
    **options,
) -> nnx.Module:
  """Inverse of `save_orbax` (restores each array onto its sharding).

  `options` as `from_pretrained`'s; the arrays are restored in the saved
  dtype cast to `param_dtype` (default `dtype`).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  orbax_dir = os.path.abspath(orbax_dir)
  config = read_config(orbax_dir)
  graphdef, state = nnx.split(abstract_model(config, dtype, **options))
  flat = dict(nnx.to_flat_state(state))
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {}
  for path, var in flat.items():
    shard = (sharding(path, var.shape) if sharding else None) or default
    target[path] = jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=shard)
  target = nnx.to_pure_dict(nnx.from_flat_state(target))
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.join(orbax_dir, "params"), target)
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)


def _training_run_of(path: str) -> str | None:
  """The workdir when `path` is a training run's (or its checkpoints/ or
  checkpoints/<step>), else None."""
  path = os.path.abspath(path)
  for _ in range(3):
    if os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(
        os.path.join(path, "config.json")
    ):
      return path
    path = os.path.dirname(path)
  return None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  a = sub.add_parser("to-orbax", help="HF folder -> Orbax checkpoint")
  a.add_argument("hf_dir")
  a.add_argument("orbax_dir")
  a.add_argument(
      "--dtype", default="float32", help="dtype of the stored parameters"
  )
  b = sub.add_parser("to-hf", help="Orbax checkpoint -> HF folder")
  b.add_argument("orbax_dir")
  b.add_argument("hf_dir")
  b.add_argument(
      "--dtype", default="bfloat16", help="dtype of the written tensors"
  )
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  if args.cmd == "to-orbax":
    model = from_pretrained(args.hf_dir, dtype)
    save_orbax(model, args.orbax_dir, hf_dir=args.hf_dir)
    print(f"wrote {args.orbax_dir}")
  else:
    run = _training_run_of(args.orbax_dir)
    if run:
      parser.error(
          f"{args.orbax_dir} is a training run's checkpoint, not a to-orbax"
          " folder; export it with: python -m faithful_rl.export"
          f" --workdir={run} --out={args.hf_dir}"
      )
    model = load_orbax(args.orbax_dir, jnp.float32)
    names = save_pretrained(
        model, args.hf_dir, dtype=dtype, copy_files_from=args.orbax_dir
    )
    print(f"wrote {args.hf_dir}: {', '.join(names)}")


if __name__ == "__main__":
  main()
