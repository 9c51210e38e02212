"""Hugging Face checkpoints <-> Flax NNX parameters, tensor by tensor.

The mapping is a pure function of the parameter path: HF `Linear` weights
are [out, in] and ours [in, out]; the patch Conv3d (stride = kernel) is a
linear map of the flattened (channel, time, row, col) patch; norms, biases
and the embedding are copied. Both HF key layouts are read: the published
one (`model.layers.*`, `visual.*`) and `transformers>=5`' in-memory one
(`model.language_model.*`, `model.visual.*`); we write the published one,
which is also what `transformers` writes.

Loading never holds two copies of the model: the abstract model comes from
`nnx.eval_shape`, then each tensor is read from a memory-mapped shard,
converted, placed on its device (with its sharding, if given), and dropped;
a shard is closed before the next is opened.

CLI (an Orbax copy restores faster and sharded):
  python -m faithful_rl.models.convert_hf to-orbax HF_DIR ORBAX_DIR
  python -m faithful_rl.models.convert_hf to-hf ORBAX_DIR HF_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from faithful_rl.models import safetensors_io
from faithful_rl.models.config import CheckpointError
from faithful_rl.models.config import ModelConfig
from faithful_rl.models.config import read_config
from faithful_rl.models.qwen2_5_vl import Qwen2_5_VL

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

MODEL_CLASSES = {"qwen2_5_vl": Qwen2_5_VL}


def model_class(config: ModelConfig):
  return MODEL_CLASSES[config.family]


# ---------------------------------------------------------------------------
# The name mapping.
# ---------------------------------------------------------------------------


def hf_name(path: Path) -> str:
  """Our parameter path -> the published HF tensor name."""
  parts = [str(p) for p in path]
  root = {"visual": "visual", "language_model": "model", "lm_head": "lm_head"}
  parts[0] = root[parts[0]]
  if parts[-2:] == ["patch_embed", "kernel"]:
    parts[-1] = "proj.weight"
  elif parts[-1] in ("kernel", "embedding"):
    parts[-1] = "weight"
  parts = [re.sub(r"^mlp_(\d+)$", r"mlp.\1", p) for p in parts]
  return ".".join(parts)


def normalize_hf_name(name: str) -> str:
  """Any HF layout -> the published layout."""
  if name.startswith("model.language_model."):
    return "model." + name[len("model.language_model.") :]
  if name.startswith("model.visual."):
    return name[len("model.") :]
  return name


def _is_patch_embed(path: Path) -> bool:
  return tuple(str(p) for p in path[-2:]) == ("patch_embed", "kernel")


def to_hf_layout(path: Path, x: np.ndarray, config: ModelConfig) -> np.ndarray:
  """Our array -> the HF tensor."""
  if _is_patch_embed(path):
    v = config.vision
    return x.T.reshape(
        v.hidden_size,
        v.in_channels,
        v.temporal_patch_size,
        v.patch_size,
        v.patch_size,
    )
  if str(path[-1]) == "kernel":
    return x.T
  return x


def from_hf_layout(path: Path, x: np.ndarray) -> np.ndarray:
  """The HF tensor -> our array."""
  if _is_patch_embed(path):
    return x.reshape(x.shape[0], -1).T
  if str(path[-1]) == "kernel":
    return x.T
  return x


def hf_shape(path: Path, shape: tuple[int, ...], config) -> tuple[int, ...]:
  if _is_patch_embed(path):
    v = config.vision
    return (
        v.hidden_size,
        v.in_channels,
        v.temporal_patch_size,
        v.patch_size,
        v.patch_size,
    )
  if str(path[-1]) == "kernel":
    return tuple(reversed(shape))
  return tuple(shape)


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


def abstract_model(config: ModelConfig, dtype=jnp.float32):
  cls = model_class(config)
  return nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))


def from_pretrained(
    hf_dir: str,
    dtype=jnp.float32,
    *,
    sharding: ShardingFn | None = None,
) -> nnx.Module:
  """Loads a local HF Qwen-VL folder (family read from config.json).

  Args:
    hf_dir: folder with config.json and *.safetensors (sharded or not).
    dtype: parameter and activation dtype (e.g. jnp.bfloat16).
    sharding: optional (path, shape) -> jax.sharding.Sharding, to place
      each parameter directly where it lives.

  Returns:
    The model, with `model.config` read from `config.json`.
  """
  config = read_config(hf_dir)
  graphdef, state = nnx.split(abstract_model(config, dtype))
  flat = dict(nnx.to_flat_state(state))
  expected = {hf_name(p): p for p in flat}
  tied = config.text.tie_word_embeddings
  values: dict[Path, jax.Array] = {}
  unexpected = []
  for fname in sorted(weight_files(hf_dir)):
    fpath = os.path.join(hf_dir, fname)
    with safetensors_io.SafetensorsFile(fpath) as f:
      for raw in f.keys():
        name = normalize_hf_name(raw)
        if name not in expected:
          if tied and name == "lm_head.weight":
            continue  # the tied head is the embedding
          unexpected.append(f"{raw} ({fname})")
          continue
        path = expected[name]
        var = flat[path]
        want = hf_shape(path, var.shape, config)
        if f.shape(raw) != want:
          raise CheckpointError(
              f"{fpath}: tensor {raw!r} has shape {list(f.shape(raw))},"
              f" expected {list(want)} from config.json"
          )
        # A private copy: the memory map must not outlive this shard.
        arr = np.array(from_hf_layout(path, f.get(raw)), dtype=var.dtype)
        shard = sharding(path, arr.shape) if sharding else None
        values[path] = (
            jax.device_put(arr, shard)
            if shard is not None
            else jnp.asarray(arr)
        )
        del arr
  if unexpected:
    raise CheckpointError(
        f"{hf_dir}: {len(unexpected)} tensors not part of a"
        f" {config.family} model: {', '.join(unexpected[:5])}"
    )
  missing = [hf_name(p) for p in flat if p not in values]
  if missing:
    raise CheckpointError(
        f"{hf_dir}: {len(missing)} tensors missing from the checkpoint:"
        f" {', '.join(missing[:5])}"
    )
  for path, var in flat.items():
    var.value = values[path]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ---------------------------------------------------------------------------
# Saving.
# ---------------------------------------------------------------------------


def save_pretrained(
    model: nnx.Module,
    out_dir: str,
    *,
    dtype=None,
    max_shard_bytes: int = 2 * 1024**3,
    copy_files_from: str | None = None,
) -> list[str]:
  """Writes `model` as a HF folder that `transformers` loads.

  Args:
    model: a model from this package.
    out_dir: destination folder (created).
    dtype: cast parameters to this dtype (default: keep).
    max_shard_bytes: shard size; above one shard an index file is written.
    copy_files_from: a HF folder whose tokenizer/processor files to copy.

  Returns:
    The weight files written.
  """
  config: ModelConfig = model.config
  os.makedirs(out_dir, exist_ok=True)
  flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  items = sorted(((hf_name(p), p, v) for p, v in flat), key=lambda t: t[0])
  shards, current, size = [], [], 0
  for name, path, var in items:
    itemsize = np.dtype(dtype or var.dtype).itemsize
    nbytes = int(np.prod(var.shape)) * itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append((name, path, var))
    size += nbytes
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
    for name, path, var in shard:
      arr = np.asarray(jax.device_get(var[...]))
      if dtype is not None:
        arr = arr.astype(dtype)
      tensors.append((name, to_hf_layout(path, arr, config)))
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
  hf_config = config.to_hf()
  hf_config.dtype = str(np.dtype(dtype or model.dtype).name)
  hf_config.to_json_file(os.path.join(out_dir, "config.json"))
  if copy_files_from:
    copy_aux_files(copy_files_from, out_dir)
  return names


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
  model.config.to_hf().to_json_file(os.path.join(out_dir, "config.json"))
  if hf_dir:
    copy_aux_files(hf_dir, out_dir)


def load_orbax(
    orbax_dir: str, dtype=jnp.float32, *, sharding: ShardingFn | None = None
) -> nnx.Module:
  """Inverse of `save_orbax` (restores each array onto its sharding)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  orbax_dir = os.path.abspath(orbax_dir)
  config = read_config(orbax_dir)
  graphdef, state = nnx.split(abstract_model(config, dtype))
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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  a = sub.add_parser("to-orbax", help="HF folder -> Orbax checkpoint")
  a.add_argument("hf_dir")
  a.add_argument("orbax_dir")
  a.add_argument("--dtype", default="float32")
  b = sub.add_parser("to-hf", help="Orbax checkpoint -> HF folder")
  b.add_argument("orbax_dir")
  b.add_argument("hf_dir")
  b.add_argument("--dtype", default="float32")
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  if args.cmd == "to-orbax":
    model = from_pretrained(args.hf_dir, dtype)
    save_orbax(model, args.orbax_dir, hf_dir=args.hf_dir)
    print(f"wrote {args.orbax_dir}")
  else:
    model = load_orbax(args.orbax_dir, dtype)
    names = save_pretrained(model, args.hf_dir, copy_files_from=args.orbax_dir)
    print(f"wrote {args.hf_dir}: {', '.join(names)}")


if __name__ == "__main__":
  main()
