"""The trainer end to end on `runlocal`: exact resume, crash safety,
preemption, errors, a loss chosen by name.

Most runs are subprocesses of `python -m faithful_rl.train` (a SIGKILL or
SIGTERM has to hit a real process). A persistent compilation cache shared
by the runs keeps them at a few seconds each after the first. All are
marked slow (`pytest -m "not slow"` skips them); `make test` runs them.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import helpers

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "--config=configs/demo.py:runlocal"


def _run(workdir, *extra, env=None, check=True):
  e = dict(os.environ)
  e.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/faithful_rl_test_jax_cache")
  e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  e.update(env or {})
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "faithful_rl.train",
          CONFIG,
          f"--workdir={workdir}",
      ]
      + list(extra),
      cwd=ROOT,
      env=e,
      capture_output=True,
      text=True,
      timeout=600,
  )
  if check and proc.returncode != 0:
    raise AssertionError(
        f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    )
  return proc


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """An uninterrupted runlocal run (SFT 4 steps + RL 2 steps)."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  proc = _run(workdir)
  return workdir, proc


def test_runlocal_end_to_end(finished):
  workdir, proc = finished
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert {"init", "sft", "rl", "chance"} <= set(results)
  assert 0 < results["chance"] < 1
  assert "held-out accuracy" in proc.stdout
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_steps = [r["step"] for r in rows if r["split"] == "train"]
  assert train_steps == sorted(train_steps) and train_steps[-1] == 6
  rl_rows = [r for r in rows if r["split"] == "train" and "reward" in r]
  assert rl_rows and all(np.isfinite(r["loss"]) for r in rl_rows)
  assert os.path.exists(os.path.join(workdir, "curves.png"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  step, params = helpers.final_params(workdir)
  assert step == 6 and params


def test_sigkill_and_resume_is_bitwise_identical(finished, tmp_path):
  ref_dir, _ = finished
  workdir = str(tmp_path / "killed")
  # Killed (SIGKILL, no cleanup) right after the update of step 5 (RL),
  # after the checkpoint of step 4 and before the one of step 6.
  proc = _run(workdir, env={"FAITHFUL_RL_TEST_KILL_AT_STEP": "5"}, check=False)
  assert proc.returncode == -signal.SIGKILL
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert max(r["step"] for r in rows) == 5  # logged, then killed
  resumed = _run(workdir)
  assert "[resume]" in resumed.stdout and "step 4" in resumed.stdout
  step, params = helpers.final_params(workdir)
  ref_step, ref = helpers.final_params(ref_dir)
  assert step == ref_step == 6
  assert params.keys() == ref.keys()
  for k in ref:
    np.testing.assert_array_equal(params[k], ref[k], err_msg=k)
  # The metrics file continues as an uninterrupted run's would.
  steps = [
      json.loads(l)["step"]
      for l in open(os.path.join(workdir, "metrics.jsonl"))
      if json.loads(l)["split"] == "train"
  ]
  assert steps == sorted(set(steps))


def test_crash_while_writing_a_checkpoint(finished, tmp_path):
  ref_dir, _ = finished
  workdir = str(tmp_path / "crashed")
  proc = _run(workdir, env={"FAITHFUL_RL_TEST_CRASH_IN_SAVE": "4"}, check=False)
  assert proc.returncode == -signal.SIGKILL
  from faithful_rl import checkpointing

  ckpts = checkpointing.Checkpoints(workdir)
  assert ckpts.latest_step() == 2  # step 4 never became loadable
  ckpts.close()
  resumed = _run(workdir)
  assert "step 2" in resumed.stdout
  _, params = helpers.final_params(workdir)
  _, ref = helpers.final_params(ref_dir)
  for k in ref:
    np.testing.assert_array_equal(params[k], ref[k], err_msg=k)


def _checkpoint_files(workdir):
  root = os.path.join(workdir, "checkpoints")
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      out[p] = os.path.getmtime(p)
  return out


def test_nan_loss_stops_without_touching_the_checkpoint(tmp_path):
  workdir = str(tmp_path / "nan")
  proc = _run(workdir, "--config.debug.nan_at_step=3", check=False)
  assert proc.returncode == 1
  assert "non-finite loss" in proc.stderr and "step 3" in proc.stderr
  assert "step 2" in proc.stderr  # names the last good checkpoint
  from faithful_rl import checkpointing

  ckpts = checkpointing.Checkpoints(workdir)
  assert ckpts.latest_step() == 2
  ckpts.close()


def test_corrupted_metrics_file_stops_cleanly(finished, tmp_path):
  ref_dir, _ = finished
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(ref_dir, workdir)
  path = os.path.join(workdir, "metrics.jsonl")
  lines = open(path).read().splitlines()
  lines[2] = lines[2][: len(lines[2]) // 2]  # half a line
  open(path, "w").write("\n".join(lines) + "\n")
  before = _checkpoint_files(workdir)
  proc = _run(workdir, "--config.rl.steps=3", check=False)
  assert proc.returncode == 1
  assert "metrics.jsonl:3" in proc.stderr and "corrupted" in proc.stderr
  assert _checkpoint_files(workdir) == before
  assert open(path).read().splitlines()[2] == lines[2]  # left as found


def test_incompatible_workdir_is_refused(finished, tmp_path):
  ref_dir, _ = finished
  workdir = str(tmp_path / "other_model")
  shutil.copytree(ref_dir, workdir)
  before = _checkpoint_files(workdir)
  proc = _run(
      workdir, "--config.model.scratch.text.hidden_size=64", check=False
  )
  assert proc.returncode == 1
  assert "different model" in proc.stderr
  assert "model.scratch.text.hidden_size: 128 -> 64" in proc.stderr
  assert _checkpoint_files(workdir) == before


def test_sigterm_finishes_the_step_saves_and_resumes_bitwise(
    finished, tmp_path
):
  ref_dir, _ = finished
  workdir = str(tmp_path / "preempted")
  # A real SIGTERM reaches the process just before step 4 (the first RL
  # step) runs: it finishes that step, saves step 5, and exits 0.
  proc = _run(workdir, env={"FAITHFUL_RL_TEST_SIGTERM_AT_STEP": "4"})
  assert "[preempted] stopped after step 5 of 6" in proc.stdout
  assert "rerun the same command to resume" in proc.stdout
  from faithful_rl import checkpointing

  ckpts = checkpointing.Checkpoints(workdir)
  assert ckpts.latest_step() == 5
  ckpts.close()
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  resumed = _run(workdir)
  assert "[resume]" in resumed.stdout and "step 5" in resumed.stdout
  step, params = helpers.final_params(workdir)
  ref_step, ref = helpers.final_params(ref_dir)
  assert step == ref_step == 6
  for k in ref:
    np.testing.assert_array_equal(params[k], ref[k], err_msg=k)


class _FakeWandb:
  """Stands in for the `wandb` module: records what the writer sends."""

  def __init__(self):
    self.inits, self.logs, self.finished = [], [], 0

  def init(self, **kwargs):
    self.inits.append(kwargs)
    return self

  id = "run123"

  def log(self, row, step):
    self.logs.append((step, row))

  def finish(self):
    self.finished += 1


def test_a_registered_loss_trains_by_its_name(tmp_path, monkeypatch):
  """A loss registered here is picked by --config.rl.loss; W&B gets the
  metrics when a project is named (a stand-in module: optional package)."""
  from configs import qwen2_5_vl_dapo
  from faithful_rl import losses
  from faithful_rl import train

  calls = []

  @losses.register("policy", "test_scaled_dapo")
  def scaled(**kwargs):
    calls.append(1)
    loss, metrics = losses.dapo_loss(**kwargs)
    return 2.0 * loss, dict(metrics, marker=jax.numpy.float32(7.0))

  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  config = qwen2_5_vl_dapo.get_config("runlocal")
  config.rl.loss = "test_scaled_dapo"
  config.rl.steps = 1
  config.data.eval_split = config.data.test_split = "none"
  config.wandb.project = "faithful_rl_test"
  workdir = str(tmp_path / "registered")
  train.train(config, workdir)
  assert calls  # traced into the update
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert train_rows[-1]["marker"] == 7.0 and train_rows[-1]["step"] == 1
  # The real recipes recompute old_logp; in float32 (runlocal) the
  # sampler's agree with the training forward's.
  assert config.rl.old_logp == "recompute"
  assert 0 <= train_rows[-1]["old_logp_gap_max"] < 1e-5
  assert fake.inits[0]["project"] == "faithful_rl_test"
  assert fake.logs == [(1, {k: v for k, v in fake.logs[0][1].items()})]
  assert fake.logs[0][1]["train/marker"] == 7.0 and fake.finished == 1
  assert open(os.path.join(workdir, "wandb_id")).read() == "run123"


def test_a_registered_reward_and_format_train_by_name(tmp_path):
  """A reward and a dataset format registered here are picked by
  --config.rl.rewards and --config.data.format."""
  from PIL import Image

  from configs import qwen2_5_vl_dapo
  from faithful_rl import rewards
  from faithful_rl import train
  from faithful_rl.data import formats
  from faithful_rl.data import jsonl

  reads, scored = [], []

  @formats.FORMATS.register("test_pipes")
  def read_pipes(path, report):
    """One record a line: id|image|question|answer."""
    reads.append(path)
    lines = open(path).read().splitlines()

    def record(line):
      rid, image, question, answer = line.split("|")
      return dict(id=rid, images=[image], question=question, answer=answer)

    rows = ((i + 1, lambda l=l: record(l)) for i, l in enumerate(lines))
    yield from jsonl.check_records(report, rows, os.path.dirname(path))

  @rewards.REWARDS.register("test_bonus")
  def bonus(responses, spec, *, value):
    del spec
    scored.append(len(responses.texts))
    return np.full((len(responses.texts),), value, np.float32)

  colours = {"red": (200, 30, 30), "blue": (30, 30, 200)}
  lines = []
  for i in range(8):
    name = list(colours)[i % 2]
    Image.new("RGB", (56, 56), colours[name]).save(tmp_path / f"{i}.png")
    lines.append(f"q{i}|{i}.png|Which colour is the square?|{name}")
  path = tmp_path / "train.pipes"
  path.write_text("\n".join(lines) + "\n")

  config = qwen2_5_vl_dapo.get_config("runlocal")
  config.data.name = "jsonl_vqa/pipes"
  config.data.format = "test_pipes"
  config.data.files = {"train": str(path)}
  config.data.eval_split = config.data.test_split = "none"
  config.rl.rewards = ("correct", "test_bonus")
  config.rl.reward_weights = {"test_bonus": 2.0}
  config.rl.reward_options = {"test_bonus": {"value": 0.25}}
  config.rl.dynamic_sampling = False  # the bonus alone never varies
  config.rl.steps = 1
  workdir = str(tmp_path / "by_name")
  train.train(config, workdir)
  assert reads == [str(path)]
  assert scored and set(scored) == {16}  # 4 prompts x G = 4 per round
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  last = [r for r in rows if r["split"] == "train"][-1]
  assert last["test_bonus"] == 0.25
  # reward = correct + 2 * 0.25, over the same rows as batch_accuracy.
  assert last["reward"] == pytest.approx(last["batch_accuracy"] + 0.5)
  assert "format" not in last and "overlong" not in last
