r"""Per-device memory of the real recipes' programs, from the compiler.

  python benchmarks/memory.py          # Qwen2.5-VL 3B/7B, Qwen3-VL 8B
  python benchmarks/memory.py --arch=qwen2_5_vl_7b --program=decoder
  python benchmarks/memory.py --arch=qwen3_vl_8b --program=update,rollout

Nothing is allocated: each program is lowered from abstract inputs
(`jax.ShapeDtypeStruct`s carrying their shardings) on a mesh of 8 fake CPU
devices (fsdp=8), compiled ahead of time, and XLA's `memory_analysis()` of
the compiled program gives its per-device argument, output and temporary
bytes. Parameters are float32 masters sharded by `faithful_rl.sharding`'s
rules; compute is bf16; layers are scanned and rematerialised as the
recipe's `model.remat` says.

Programs (per architecture):
  decoder  the decoder's training forward + backward, one 2,304-token row
           per device, a sum-of-squares loss on the final hidden states
           (the figure the model issue tracks: 387 GiB before scanning,
           remat and fused attention).
  update   the RL update step of the EASE recipe at its micro-batch: the
           shared-prefix policy forward with the attention probe, the
           DAPO + EASE loss, gradients and the AdamW update (the vision
           tower frozen, as the recipes freeze it).
  rollout  the sampling program at the recipe's rollout chunk: vision
           encoding, prefill, the KV cache repeated G times, decoding.
  reference  the no-gradient log-prob pass (rl.old_logp='recompute', the
           reference KL) over the batch in chunks of rl.analysis_chunk.

Attention runs as the blocked `flash` kernel: XLA:CPU cannot compile the
GPU and TPU kernels (cuDNN, splash), and `flash` has their memory profile
(O(T * block) per head instead of O(T * S)), so the figures stand for the
accelerator programs. Prints a table with the fit against `--hbm` GiB and
the headroom left.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

GiB = 2**30


def _setup(devices: int):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={devices}"
  )
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def recipe(arch: str):
  """The EASE recipe's config for `arch` (family and variant from the
  name: qwen2_5_vl_7b, qwen3_vl_8b, ...)."""
  import importlib  # pylint: disable=g-import-not-at-top

  family, variant = arch.rsplit("_", 1)
  module = importlib.import_module(f"configs.{family}_ease")
  return module.get_config(f"variant={variant}")


class Report:
  """Rows of (arch, program, shapes, memory, compile time)."""

  def __init__(self, hbm: float):
    self.hbm = hbm
    self.rows = []

  def compile(self, arch, program, shapes, lower):
    """Compiles `lower()` (a `jax.stages.Lowered`), timing lowering and
    compilation, and adds its row."""
    t0 = time.perf_counter()
    compiled = lower().compile()
    self.add(arch, program, shapes, compiled, time.perf_counter() - t0)

  def add(self, arch, program, shapes, compiled, seconds):
    ma = compiled.memory_analysis()
    args = ma.argument_size_in_bytes / GiB
    out = ma.output_size_in_bytes / GiB
    temp = ma.temp_size_in_bytes / GiB
    alias = ma.alias_size_in_bytes / GiB
    total = args + out + temp - alias
    self.rows.append((arch, program, shapes, args, out, temp, alias, total,
                      seconds))  # fmt: skip
    print(
        f"{arch:14s} {program:8s} {shapes:34s} args {args:6.2f} out"
        f" {out:6.2f} temp {temp:6.2f} alias {alias:6.2f} total"
        f" {total:6.2f} GiB  fit {self.fit(total)}  compile {seconds:.0f} s",
        flush=True,
    )

  def fit(self, total: float) -> str:
    headroom = 1 - total / self.hbm
    verdict = "yes" if headroom >= 0.15 else ("tight" if total <= self.hbm
                                              else "NO")  # fmt: skip
    return f"{verdict} ({100 * headroom:.0f}% free of {self.hbm:.0f})"

  def table(self) -> str:
    lines = [
        (
            "| model | program | shapes (per step) | args | out | temp | total"
            f" GiB/device | fits {self.hbm:.0f} GiB | compile s |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, prog, shapes, a, o, t, _, tot, sec in self.rows:
      lines.append(
          f"| {arch} | {prog} | {shapes} | {a:.2f} | {o:.2f} | {t:.2f} |"
          f" **{tot:.2f}** | {self.fit(tot)} | {sec:.0f} |"
      )
    return "\n".join(lines)


def abstract_params(model_config, config, mesh):
  """(graphdef, params as ShapeDtypeStructs with their shardings)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from faithful_rl import models  # pylint: disable=g-import-not-at-top
  from faithful_rl import sharding  # pylint: disable=g-import-not-at-top
  from faithful_rl import train  # pylint: disable=g-import-not-at-top

  options = train.model_options(config)
  options["attention"] = "flash"
  graphdef, state = nnx.split(
      nnx.eval_shape(
          lambda: models.create(
              model_config, dtype=jnp.dtype(config.model.dtype), **options
          )
      )
  )
  params = nnx.to_pure_dict(state)
  shardings = sharding.tree_shardings(params, mesh)
  return graphdef, jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      params,
      shardings,
  )


def _sharded(mesh, tree, axis: int):
  """The abstract leaves of `tree` with `axis` over the mesh's batch axes."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  def one(x):
    spec = [None] * len(x.shape)
    spec[axis] = ("data", "fsdp")
    return jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, P(*spec))
    )

  return jax.tree.map(one, tree)


def _buckets(config):
  """The recipe's largest buckets: prompt, patch slots, response."""
  return (
      config.data.prompt_buckets[-1],
      config.data.patch_buckets[-1],
      config.rl.sampling.max_new_tokens,
  )


def _chunks(config, model_config, mesh, rows: int, m: int):
  """M abstract chunks of `rows` rows at the recipe's largest buckets, the
  rows over the mesh's batch axes (the learner's `rl.layout`)."""
  from faithful_rl import rl  # pylint: disable=g-import-not-at-top

  g = config.rl.num_samples
  tp, patches, r = _buckets(config)
  batch = rl.RolloutBatch.abstract(
      prompts=max(rows // g, 1),
      num_samples=min(rows, g),
      prompt_len=tp,
      patches=patches,
      response_len=r,
      model_config=model_config,
      leading=(m,),
  )
  return _sharded(mesh, batch, 1)


# ---------------------------------------------------------------------------
# The programs.
# ---------------------------------------------------------------------------


def decoder_program(arch, config, mesh, report, tokens: int):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from faithful_rl import train  # pylint: disable=g-import-not-at-top

  model_config = train.model_config_for(config)
  graphdef, params = abstract_params(model_config, config, mesh)
  rows = mesh.size
  ids = _sharded(mesh, jax.ShapeDtypeStruct((rows, tokens), jnp.int32), 0)

  def loss(p, ids):
    hidden = nnx.merge(graphdef, p)(ids, return_logits=False).hidden
    return jnp.sum(jnp.square(hidden.astype(jnp.float32)))

  out_sh = jax.tree.map(lambda x: x.sharding, params)
  report.compile(
      arch,
      "decoder",
      f"1 x {tokens} tok/device, remat={config.model.remat}",
      lambda: jax.jit(jax.grad(loss), out_shardings=out_sh).lower(params, ids),
  )


def update_program(arch, config, mesh, report):
  """The recipe's RL update (EASE on) at its micro-batch: the learner's
  own jitted update over the minibatch's micro-batches."""
  import jax  # pylint: disable=g-import-not-at-top

  from faithful_rl import optim  # pylint: disable=g-import-not-at-top
  from faithful_rl import steps  # pylint: disable=g-import-not-at-top
  from faithful_rl import train  # pylint: disable=g-import-not-at-top
  from faithful_rl.rl import loss as rl_loss  # pylint: disable=g-import-not-at-top

  model_config = train.model_config_for(config)
  graphdef, params = abstract_params(model_config, config, mesh)
  rc = config.rl
  g, rows = rc.num_samples, rc.micro_batch
  minibatch = rc.num_prompts * g // rc.num_minibatches
  m = minibatch // rows
  tp, patches, r = _buckets(config)
  batch = _chunks(config, model_config, mesh, rows, m)
  tx = train.make_tx(config, "rl", params, 100)
  abstract_state, shardings = train.abstract_train_state(params, tx, mesh)
  update = steps.make_update(
      rl_loss.RL,
      tx,
      graphdef,
      steps.RLConfig.from_config(rc),
      state_shardings=shardings,
      frozen=optim.frozen_patterns(rc.optim),
  )
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  v = patches // model_config.vision.merge_unit
  report.compile(
      arch,
      "update",
      f"{m} x {rows} rows ({rows // mesh.size}/device) {tp}+{r} tok, {v} vis",
      lambda: update.lower(abstract_state, batch, rng),
  )


def reference_program(arch, config, mesh, report):
  """The learner's no-gradient log-prob pass over the whole batch in chunks
  of `rl.analysis_chunk` rows: `rl.old_logp='recompute'` (the real
  recipes) and the reference KL run it."""
  import jax  # pylint: disable=g-import-not-at-top

  from faithful_rl import steps  # pylint: disable=g-import-not-at-top
  from faithful_rl import train  # pylint: disable=g-import-not-at-top
  from faithful_rl.rl import analysis  # pylint: disable=g-import-not-at-top

  model_config = train.model_config_for(config)
  graphdef, params = abstract_params(model_config, config, mesh)
  rc = config.rl
  g, rows = rc.num_samples, rc.analysis_chunk
  m = rc.num_prompts * g // rows
  tp, _, r = _buckets(config)
  chunks = _chunks(config, model_config, mesh, rows, m)
  cfg = steps.RLConfig.from_config(rc)
  report.compile(
      arch,
      "reference",
      f"{m} x {rows} rows ({rows // mesh.size}/device) {tp}+{r} tok",
      lambda: jax.jit(analysis.reference_chunks, static_argnums=(1, 3)).lower(
          params, graphdef, chunks, cfg
      ),
  )


def rollout_program(arch, config, mesh, report):
  """The learner's sampling program at the recipe's rollout chunk."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from faithful_rl import rl  # pylint: disable=g-import-not-at-top
  from faithful_rl import rollout  # pylint: disable=g-import-not-at-top
  from faithful_rl import train  # pylint: disable=g-import-not-at-top

  model_config = train.model_config_for(config)
  graphdef, params = abstract_params(model_config, config, mesh)
  rc = config.rl
  g, chunk = rc.num_samples, rc.rollout_chunk
  tp, patches, r = _buckets(config)
  batch = rl.RolloutBatch.abstract(
      prompts=chunk // g,
      num_samples=g,
      prompt_len=tp,
      patches=patches,
      response_len=r,
      model_config=model_config,
  )
  prompts = _sharded(mesh, batch.prompt_inputs(), 0)
  prompts["position_ids"] = _sharded(
      mesh, batch.prompt_inputs()["position_ids"], 1
  )
  row_ids = _sharded(mesh, jax.ShapeDtypeStruct((chunk,), jnp.int32), 0)
  sampling = rollout.SamplingConfig.from_config(
      rc.sampling, num_samples=g, max_new_tokens=r
  )
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  report.compile(
      arch,
      "rollout",
      f"{chunk} seq ({chunk // mesh.size}/device) {tp}+{r} tok",
      lambda: rollout.Engine().lower(
          graphdef, sampling, params, prompts, rng, row_ids
      ),
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--arch", default="qwen2_5_vl_3b,qwen2_5_vl_7b,qwen3_vl_8b"
  )
  parser.add_argument("--program", default="decoder,update,rollout,reference")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--hbm", type=float, default=80.0, help="GiB per chip")
  parser.add_argument("--decoder_tokens", type=int, default=2304)
  args = parser.parse_args(argv)
  _setup(args.devices)
  import jax  # pylint: disable=g-import-not-at-top

  from faithful_rl import sharding  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh({"data": 1, "fsdp": args.devices, "tensor": 1})
  report = Report(args.hbm)
  programs = args.program.split(",")
  with jax.set_mesh(mesh):
    for arch in args.arch.split(","):
      config = recipe(arch)
      if "decoder" in programs:
        decoder_program(arch, config, mesh, report, args.decoder_tokens)
      if "update" in programs:
        update_program(arch, config, mesh, report)
      if "rollout" in programs:
        rollout_program(arch, config, mesh, report)
      if "reference" in programs:
        reference_program(arch, config, mesh, report)
  print()
  print(report.table())


if __name__ == "__main__":
  main()
