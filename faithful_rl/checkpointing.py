"""Orbax checkpoints of a run: train state, data position, run metadata.

A checkpoint holds {params, opt_state, step} (restored straight onto their
shardings), the data iterators' states (one per process) and the host-side
counters as JSON, the frozen reference parameters of a KL-regularised RL
stage, and the run's config. Orbax writes each step into a temporary folder and
renames it when complete, so a crash mid-write leaves the previous
checkpoint as the latest loadable one. The config saved in the workdir is
compared with a resumed run's: a different model is an error that names
the differing keys, before anything is written.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

# Config sections whose change makes a workdir's checkpoints unusable.
COMPATIBILITY_KEYS = ("model",)


class IncompatibleWorkdir(RuntimeError):
  """The workdir holds a run of a different model/config."""


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  if isinstance(d, dict):
    for k, v in d.items():
      out.update(flatten(v, f"{prefix}{k}."))
  else:
    out[prefix[:-1]] = d
  return out


def check_compatible(workdir: str, config_dict: dict, write: bool = True):
  """Writes `config.json` on a fresh workdir, or checks it matches.

  With several processes only one writes (`write`); a process that finds
  no file yet has nothing to compare.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    if not write:
      return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(config_dict, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise IncompatibleWorkdir(f"{path}: unreadable run config: {e}") from e
  current = json.loads(json.dumps(config_dict, default=str))
  diffs = []
  for key in COMPATIBILITY_KEYS:
    a, b = flatten(saved.get(key, {})), flatten(current.get(key, {}))
    for k in sorted(set(a) | set(b)):
      if a.get(k) != b.get(k):
        diffs.append(f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
  if diffs:
    raise IncompatibleWorkdir(
        f"{os.path.dirname(path)} holds a run with a different model"
        f" ({'; '.join(diffs[:6])}). Use a new --workdir, or restore the"
        " original settings."
    )


def _kill_when_writing(directory: str, step: int) -> None:
  """Test hook: SIGKILL this process once `step`'s temporary folder exists.

  Orbax writes a checkpoint into `<step>.orbax-checkpoint-tmp-*` and renames
  it when complete; dying in between is a crash mid-write.
  """
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  def watch():
    while True:
      names = os.listdir(directory) if os.path.isdir(directory) else []
      if any(n.startswith(f"{step}.") and "tmp" in n for n in names):
        os.kill(os.getpid(), signal.SIGKILL)
      time.sleep(0.0005)

  threading.Thread(target=watch, daemon=True).start()


class Checkpoints:
  """CheckpointManager over `workdir/checkpoints`, keeping the last N."""

  def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(
      self, step: int, state: Any, host: dict[str, Any], ref: Any = None
  ) -> None:
    """Saves the train state, the JSON-able host state and, when given, the
    frozen reference parameters of a KL-regularised RL stage.

    Every process calls it (each writes its shards; process 0 the JSON).
    """
    crash_at = os.environ.get("FAITHFUL_RL_TEST_CRASH_IN_SAVE")
    if crash_at and int(crash_at) == step:
      _kill_when_writing(self.directory, step)
    items = dict(
        state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)
    )
    if ref is not None:
      items["ref"] = ocp.args.StandardSave(ref)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, ref: Any = None):
    """(state, host, ref) of `step`, placed as the abstract trees say.

    `ref`: the abstract reference parameters; the result's ref is None when
    the checkpoint holds none.
    """
    items = dict(
        state=ocp.args.StandardRestore(abstract_state),
        host=ocp.args.JsonRestore(),
    )
    if ref is not None and os.path.isdir(
        os.path.join(self.directory, str(step), "ref")
    ):
      items["ref"] = ocp.args.StandardRestore(ref)
    else:
      ref = None
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"], out["host"], (out["ref"] if ref is not None else None)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def saved_steps(workdir: str) -> list[int]:
  """The steps of `workdir`'s complete checkpoints, in increasing order."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    return []
  options = ocp.CheckpointManagerOptions(create=False)
  with ocp.CheckpointManager(directory, options=options) as manager:
    return sorted(int(s) for s in manager.all_steps())


def resolve_step(workdir: str, step: int | None = None) -> int:
  """`step` (default: the latest) if `workdir` holds its checkpoint.

  Raises FileNotFoundError naming the workdir and the saved steps.
  """
  saved = saved_steps(workdir)
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not saved:
    raise FileNotFoundError(f"{directory}: no checkpoint")
  if step is None:
    return saved[-1]
  if int(step) not in saved:
    raise FileNotFoundError(
        f"{directory}: no checkpoint of step {step}; saved steps: {saved}"
    )
  return int(step)


def load_params(workdir: str, target, step: int | None = None):
  """Parameters of another run's checkpoint, placed and cast as `target`.

  `target`: the params pytree of ShapeDtypeStructs (with shardings). Used to
  start a run from another one (e.g. RL from an SFT run).
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  step = resolve_step(workdir, step)
  with ocp.CheckpointManager(directory) as manager:
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )
  # Restored without a target, list indices come back as string keys.
  params = nnx.restore_int_paths(restored["state"]["params"])
  return jax.tree.map(
      lambda t, x: jax.device_put(jax.numpy.asarray(x, t.dtype), t.sharding),
      target,
      params,
  )


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with shardings, the restore target of `tree`."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree,
      shardings,
  )
