"""The notebooks run top to bottom on runlocal settings (nbclient)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(
    f
    for f in os.listdir(os.path.join(ROOT, "notebooks"))
    if f.endswith(".ipynb")
)


def test_outputs_are_stripped():
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, name


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
  monkeypatch.setenv("FAITHFUL_RL_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("FAITHFUL_RL_RUNLOCAL", "1")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  client = NotebookClient(
      nb,
      timeout=900,
      kernel_name="python3",
      resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}},
  )
  client.execute()
  errors = [
      o
      for c in nb.cells
      if c.cell_type == "code"
      for o in c.outputs
      if o.output_type == "error"
  ]
  assert not errors
  # It trained (or loaded) real runs: their checkpoints are there.
  assert list((tmp_path / "run").rglob("checkpoints"))
  images = [
      o
      for c in nb.cells
      if c.cell_type == "code"
      for o in c.outputs
      if "image/png" in o.get("data", {})
  ]
  assert images  # the heatmaps / curves / sweep plots were drawn
