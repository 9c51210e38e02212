"""The accelerator benchmark runs end to end (a CPU dry run, tiny model)."""

import json
import os
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import accelerator  # pylint: disable=g-import-not-at-top,wrong-import-position
import forward  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.slow
def test_accelerator_dry_run_reports_every_figure():
  r = accelerator.main(["--tiny", "--repeats=3", "--profile=5"])
  assert r["update"]["tokens_per_sec"] > 0 and r["update"]["tflops"] > 0
  for section in ("update", "decode"):
    ops = r[section]["top_ops"]
    seconds = [sec for _, sec, _ in ops]
    assert 0 < len(ops) <= 5 and min(seconds) > 0
    assert seconds == sorted(seconds, reverse=True)
    assert 0 < sum(share for _, _, share in ops) <= 1 + 1e-9
  # One forward without gradients: cheaper than the update's forward,
  # backward and optimizer step.
  assert 0 < r["old_logp"]["share_of_update"] < 1
  assert r["decode"]["tokens_per_sec"] > 0 and r["decode"]["step_bytes"] > 0
  # The backend kernel and flash compute the same attention (bf16 ulps).
  assert r["kernels"]["diff"] < 0.05
  # bf16 sampler vs bf16 training forward: closer on average than either is
  # to float32. The max is a few bf16 ulps of log-probs near -7 (one ulp is
  # 0.03 there); it moves with the thread count's reduction order.
  n = r["numerics"]
  assert np.isfinite([n["vs_train_max"], n["vs_f32_max"]]).all()
  assert n["vs_train_mean"] < n["vs_f32_mean"] and n["vs_train_max"] < 0.15


def test_op_times_counts_the_ops_inside_a_loop_not_the_loop(tmp_path):
  """One traced call of a jitted loop of matmuls: every op has a positive
  time, the loop itself is not an op (its body's ops are), and the ops'
  total fits in the call's wall time on this machine's threads."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  x = jnp.ones((128, 128))
  f = jax.jit(
      lambda x: jax.lax.fori_loop(0, 20, lambda i, y: jnp.tanh(y @ x), x)
  )
  f(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    wall = time.perf_counter() - t0
  times = accelerator.op_times(str(tmp_path))
  assert times and min(times.values()) > 0
  assert not [name for name in times if name.startswith("while")]
  assert sum(times.values()) <= wall * os.cpu_count()


def test_model_flops_by_hand():
  """6ND + attention + the vision forward, for a 2-layer toy."""
  from faithful_rl.models.config import ModelConfig
  from faithful_rl.models.config import TextConfig

  cfg = ModelConfig(
      text=TextConfig(num_hidden_layers=2, num_attention_heads=4,
                      hidden_size=32)  # fmt: skip
  )
  params = {"visual": {"w": np.zeros((10,))}, "text": np.zeros((90,))}
  flops, tokens = accelerator.model_flops(
      cfg, params, prompt_len=4, patches=8, rows=2, response_len=2
  )
  assert tokens == 4 + 2 * 2
  keys = 4 * 4 / 2 + 2 * 2 * (4 + 2 / 2)  # 8 + 20
  want = 6 * 90 * 8 + 12 * 2 * 4 * 8 * keys + 2 * 10 * 8
  assert flops == want


def test_linear_layers_pair_each_kernel_with_its_rows():
  """forward.py's matmul floor: every kernel (each layer of a stacked one)
  with the rows it multiplies; embeddings are lookups, not matmuls."""
  z = np.zeros
  params = {
      "visual": {
          "patch_embed": {"kernel": z((7, 3))},
          "blocks": {"mlp": {"kernel": z((2, 3, 4)), "bias": z((2, 4))}},
          "merger": {"kernel": z((12, 5))},
      },
      "language_model": {
          "embed_tokens": {"embedding": z((10, 4))},
          "layers": {"q_proj": {"kernel": z((3, 4, 6))}},
      },
      "lm_head": {"kernel": z((4, 10))},
  }
  got = sorted(
      (rows, w.shape) for rows, w in forward.linear_layers(params, 16, 4, 9)
  )
  want = sorted(
      [(16, (7, 3)), (16, (3, 4)), (16, (3, 4)), (4, (12, 5))]
      + [(9, (4, 6))] * 3
      + [(9, (4, 10))]
  )
  assert got == want


def test_a_failing_section_keeps_the_others_figures(tmp_path, monkeypatch):
  """A section that raises is reported and fails the run, but the sections
  after it still run and every figure reaches the JSON file."""

  def broken(*args, **kwargs):
    raise RuntimeError("no such kernel on this backend")

  monkeypatch.setattr(accelerator, "bench_decode", broken)
  out = tmp_path / "figures.json"
  with pytest.raises(SystemExit, match="sections failed: decode"):
    accelerator.main([
        "--tiny",
        "--repeats=1",
        "--skip=update,old_logp,numerics",
        f"--out={out}",
    ])
  written = json.loads(out.read_text())
  assert written["failed"] == ["decode"]
  assert written["results"]["kernels"]["diff"] < 0.05
