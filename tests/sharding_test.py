"""The sharded update step on 8 fake CPU devices equals the 1-device one."""

import os
import subprocess
import sys
import textwrap

from jax.sharding import PartitionSpec as P

from faithful_rl import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Both scripts' start: 8 fake devices, the tiny model's config and 8
# left-padded prompts with one 4 x 4-patch image each.
PREAMBLE = textwrap.dedent("""
    import re, sys
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import optax
    from configs import common
    from faithful_rl import models, rollout, sft, sharding, steps
    from faithful_rl.models import inputs as il
    import helpers

    assert jax.device_count() == 8
    cfg = helpers.tiny_config()
    rng = np.random.default_rng(0)
    b = 8
    grids = [[(1, 4, 4)]] * b
    prompts = [helpers.random_text(rng, 3 + i % 3) + helpers.image_tokens(g[0])
               + helpers.random_text(rng, 2) for i, g in enumerate(grids)]
    ids, mask = helpers.make_batch(rng, prompts)
    pos, _ = il.rope_index(ids, mask, grids, cfg)
    vis = il.vision_inputs([helpers.random_pixels(rng, g) for g in grids],
                           grids, 16, cfg.vision)
""")

SCRIPT = PREAMBLE + textwrap.dedent("""
    batch = dict(prompt_ids=ids.astype(np.int32), prompt_mask=mask.astype(bool),
                 position_ids=np.swapaxes(pos, 0, 1), vision=vis,
                 response_ids=rng.integers(3, 100, (b, 6)).astype(np.int32),
                 response_mask=np.ones((b, 6), bool),
                 example_mask=np.ones((b,), bool))

    def one_step(mesh):
      from faithful_rl import run_setup, train
      graphdef, state = nnx.split(models.create(cfg, seed=1))
      params = nnx.to_pure_dict(state)
      tx = optax.sgd(1.0)  # params move by exactly the gradient
      _, sh = train.abstract_train_state(params, tx, mesh)
      st = run_setup.fresh_state(params, tx, sh)
      sft_cfg = steps.SFTConfig.from_config(common.base_config().sft)
      upd = steps.make_update(sft.SFT, tx, graphdef, sft_cfg,
                              state_shardings=sh)
      # Four micro-batches of 2 rows, accumulated. (With one row per batch
      # device and tensor=2 the model's loss is off by 2e-4 relative, as on
      # main before micro-batches: a sharding issue of the model.)
      micro = jax.jit(sft.micro_batches, static_argnums=1)(
          sharding.put_batch(mesh, batch), 2)
      st, m = upd(st, micro, jax.random.key(0))
      return st, float(m["loss"])

    one, loss1 = one_step(sharding.make_mesh(devices=jax.devices()[:1]))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    many, loss8 = one_step(mesh)
    assert abs(loss1 - loss8) < 1e-5, (loss1, loss8)
    for a, c in zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6)
    q = many.params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), q.sharding
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (3, 32, 32)
    print("OK", loss1, loss8)
""")


def test_spec_drops_axes_that_do_not_divide():
  class FakeMesh:
    shape = {"data": 1, "fsdp": 4, "tensor": 2}

  spec = sharding.spec_for(
      "language_model/layers/0/self_attn/q_proj/kernel", (64, 64), FakeMesh()
  )
  assert spec == P("fsdp", "tensor")
  spec = sharding.spec_for(
      "language_model/layers/0/self_attn/k_proj/kernel", (64, 6), FakeMesh()
  )
  assert spec == P("fsdp", "tensor")  # 6 % 2 == 0
  spec = sharding.spec_for(
      "language_model/layers/0/self_attn/k_proj/kernel", (62, 5), FakeMesh()
  )
  assert spec == P(None, None)
  assert sharding.spec_for(
      "visual/blocks/0/norm1/weight", (32,), FakeMesh()
  ) == P(None)
  # Stacked layers: the rule names the trailing axes, the layer axis stays.
  spec = sharding.spec_for(
      "language_model/layers/self_attn/q_proj/kernel", (3, 64, 64), FakeMesh()
  )
  assert spec == P(None, "fsdp", "tensor")
  spec = sharding.spec_for(
      "language_model/layers/self_attn/q_proj/bias", (3, 64), FakeMesh()
  )
  assert spec == P(None, "tensor")


def _run_on_8_devices(script: str, flags: str = "", **env_vars) -> None:
  """Runs `script` in a process with 8 fake CPU devices (and XLA `flags`,
  and `env_vars`); it prints OK."""
  env = dict(os.environ, **env_vars)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=8 {flags}"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
      [sys.executable, "-c", script],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "OK" in proc.stdout


def test_sharded_step_on_8_fake_devices_matches_one_device():
  _run_on_8_devices(SCRIPT)


GATHER_SCRIPT = PREAMBLE + textwrap.dedent("""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    batch = dict(prompt_ids=jnp.asarray(ids, jnp.int32),
                 prompt_mask=jnp.asarray(mask, bool),
                 position_ids=jnp.asarray(pos), vision=vis)
    with jax.set_mesh(mesh):
      model = models.create(cfg, seed=3)
      graphdef, state = nnx.split(model)
      state = nnx.to_pure_dict(state)
      state = jax.device_put(state, sharding.tree_shardings(state, mesh))
      model = nnx.merge(graphdef, state)
      outs, hlo = {}, {}
      for gather in (False, True):
        cfg_s = rollout.SamplingConfig(num_samples=2, max_new_tokens=6,
                                       gather_weights=gather)
        e = rollout.Engine()
        outs[gather] = e.sample(model, batch, jax.random.key(1), cfg_s)
        n = b * 2
        hlo[gather] = e.lower(graphdef, cfg_s, state, batch, jax.random.key(1),
                              jnp.arange(n, dtype=jnp.int32)).compile().as_text()

    def decode_gathers(txt):
      comps = {}
      for c in re.split(r"\\n(?=\\S.*\\{\\n)", txt):
        comps[re.match(r"(?:ENTRY )?%?(\\S+)", c).group(1)] = c
      def inside(name, depth):
        c = comps[name]
        n = c.count(" all-gather(") if depth >= 1 else 0
        for body in re.findall(r"body=%?([\\w.\\-]+)", c):
          n += inside(body, depth + 1)
        return n
      entry = [k for k, c in comps.items() if c.startswith("ENTRY")][0]
      return inside(entry, 0)

    for k in ("tokens", "mask"):
      np.testing.assert_array_equal(np.asarray(getattr(outs[True], k)),
                                    np.asarray(getattr(outs[False], k)))
    d = np.abs(np.asarray(outs[True].logprobs) - np.asarray(outs[False].logprobs)).max()
    assert d < 1e-5
    assert decode_gathers(hlo[False]) > 0 and decode_gathers(hlo[True]) == 0

    # bf16 compute over float32 masters: the weights are cast where they lie
    # and the gather moves bf16. Read right after SPMD partitioning (later,
    # XLA:CPU's own bf16 handling turns the program's bf16 values into f32).
    import glob, os
    dump = os.environ["DUMP"]
    seen = set(glob.glob(f"{dump}/*"))
    with jax.set_mesh(mesh):
      m16 = models.create(cfg, seed=3, dtype=jnp.bfloat16,
                          param_dtype=jnp.float32)
      g16, s16 = nnx.split(m16)
      s16 = nnx.to_pure_dict(s16)
      s16 = jax.device_put(s16, sharding.tree_shardings(s16, mesh))
      cfg_s = rollout.SamplingConfig(num_samples=2, max_new_tokens=6,
                                     gather_weights=True)
      rollout.Engine().lower(g16, cfg_s, s16, batch, jax.random.key(1),
                             jnp.arange(b * 2, dtype=jnp.int32)).compile()
    [part] = [f for f in set(glob.glob(f"{dump}/*")) - seen
              if "after_spmd-partitioning" in f]
    moved = re.findall(r"= (\w+)\[[\d,]*\]\S* all-gather\(", open(part).read())
    assert moved and set(moved) == {"bf16"}, sorted(set(moved))
    print("OK")
""")


def test_sampler_gathers_the_weights_once_not_at_every_step(tmp_path):
  """8 fake devices, FSDP-sharded weights: with `gather_weights` the
  rollout program holds no all-gather inside its loops (without it, every
  decoding step gathers every layer), and samples the same tokens with the
  same log-probs (to float rounding: the contractions' order differs).
  With bf16 compute over float32 masters, the gather moves bf16 (not the
  masters, cast afterwards)."""
  _run_on_8_devices(
      GATHER_SCRIPT,
      f"--xla_dump_to={tmp_path} --xla_dump_hlo_module_re=jit_fn"
      " --xla_dump_hlo_pass_re=spmd-partitioning",
      DUMP=str(tmp_path),
      # A cached executable would skip the compile, and with it the dump.
      JAX_ENABLE_COMPILATION_CACHE="false",
  )
