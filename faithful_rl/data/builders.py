"""TFDS builders (array_record, readable without TensorFlow).

* `EvidenceVqa` ("evidence_vqa"): the synthetic task of `synthetic.py`.
* `JsonlVqa` ("jsonl_vqa"): users' files in any registered format
  (`formats.py`: JSONL, parquet, HF `datasets`), one builder config per
  dataset name.

Features avoid TensorFlow's encoders (images are stored as their encoded
bytes, boxes as float32 tensors), so `tfds.data_source` reads them back
with TensorFlow absent. A record read back has bytes for every string:

  id, question, answer, answer_type, family, reference_response: bytes
  image: PNG bytes (evidence_vqa) | images: [encoded bytes] (jsonl_vqa)
  boxes: float32[n, 4] pixels [x0, y0, x1, y1]; box_labels: [bytes]
  box_image: int32 (jsonl_vqa)

    builders.build_synthetic(data_dir)          # writes evidence_vqa
    src = builders.data_source("evidence_vqa", "train", data_dir)
    src[0]["question"]
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from faithful_rl.data import formats
from faithful_rl.data import jsonl as jsonl_lib
from faithful_rl.data import synthetic


def _features(multi_image: bool) -> tfds.features.FeaturesDict:
  encoded = tfds.features.Tensor(shape=(), dtype=np.object_)
  feats = {
      "id": tfds.features.Text(),
      "question": tfds.features.Text(),
      "answer": tfds.features.Text(),
      "answer_type": tfds.features.Text(),
      "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
      "box_labels": tfds.features.Sequence(tfds.features.Text()),
      "family": tfds.features.Text(),
      "reference_response": tfds.features.Text(),
  }
  if multi_image:
    feats["images"] = tfds.features.Sequence(encoded)
    feats["box_image"] = tfds.features.Scalar(dtype=np.int32)
  else:
    feats["image"] = encoded
  return tfds.features.FeaturesDict(feats)


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Locates its code without `importlib_resources` (not a dependency)."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=invalid-name
    return epath.Path(__file__)


# ---------------------------------------------------------------------------
# Synthetic.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class EvidenceVqaConfig(tfds.core.BuilderConfig):
  """A synthetic dataset: task knobs, split sizes and the seed.

  Attributes:
    synthetic: the task knobs (image sizes, families, distractors,
      difficulty, the language prior).
    num_train: examples in the train split.
    num_validation: examples in the validation split.
    num_test: examples in the test split.
    num_prior_test: examples in each prior split (test_in_prior,
      test_counter_prior), built when `synthetic.prior` > 0; -1: num_test.
    seed: base seed; splits draw from disjoint streams of it.
  """

  synthetic: synthetic.SyntheticConfig = synthetic.SyntheticConfig()
  num_train: int = 20000
  num_validation: int = 1000
  num_test: int = 1000
  num_prior_test: int = -1
  seed: int = 0

  def split_sizes(self) -> dict[str, int]:
    """Split name -> number of examples, for the splits this config has."""
    sizes = {
        "train": self.num_train,
        "validation": self.num_validation,
        "test": self.num_test,
    }
    if self.synthetic.prior:
      n = self.num_test if self.num_prior_test < 0 else self.num_prior_test
      sizes.update({split: n for split in synthetic.PRIOR_SPLITS})
    return {split: n for split, n in sizes.items() if n > 0}


_MIXED_SIZES = ((112, 112), (168, 112), (112, 168), (168, 168), (224, 224))


class EvidenceVqa(_Builder):
  """Synthetic evidence-grounded VQA with exact evidence boxes."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": (
          "The prior-shortcut variant (SyntheticConfig.prior) and its splits"
          " test_in_prior, test_counter_prior; other records unchanged."
      ),
  }
  BUILDER_CONFIGS = [
      EvidenceVqaConfig(
          name="default",
          description="112-px images, all task families, <= 2 distractors.",
      ),
      EvidenceVqaConfig(
          name="mixed_sizes",
          description="Images of 112..224 px, all task families.",
          synthetic=synthetic.SyntheticConfig(image_sizes=_MIXED_SIZES),
      ),
      EvidenceVqaConfig(
          name="hard",
          description="112..224 px, 4 distractors, difficulty 0.5.",
          synthetic=synthetic.SyntheticConfig(
              image_sizes=_MIXED_SIZES, max_distractors=4, difficulty=0.5
          ),
      ),
      EvidenceVqaConfig(
          name="prior",
          description=(
              "112-px images, all task families; each question's usual"
              " answer holds on 70% of train, validation and test_in_prior,"
              " never on test_counter_prior; test is uniform."
          ),
          synthetic=synthetic.SyntheticConfig(prior=0.7),
      ),
  ]
  DEFAULT_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=synthetic.__doc__,
        features=_features(multi_image=False),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    sizes = self.builder_config.split_sizes()
    return {
        split: self._generate_examples(split, n) for split, n in sizes.items()
    }

  def _generate_examples(self, split: str, num_examples: int):
    cfg = self.builder_config
    for i, rec in enumerate(
        synthetic.generate(cfg.synthetic, split, num_examples, seed=cfg.seed)
    ):
      yield i, rec


def build_synthetic(
    data_dir: str,
    config: str | EvidenceVqaConfig = "default",
    **config_overrides,
) -> EvidenceVqa:
  """Builds (or reuses) an `evidence_vqa` config under `data_dir`.

  Args:
    data_dir: TFDS data directory.
    config: a name from `EvidenceVqa.BUILDER_CONFIGS`, or a config (its
      name must differ from the predefined ones when its knobs do).
    **config_overrides: fields of `EvidenceVqaConfig` replacing those of
      the named config; the name must then be given too (as `name=`).
  """
  if isinstance(config, str):
    base = {c.name: c for c in EvidenceVqa.BUILDER_CONFIGS}
    if config not in base and not config_overrides:
      raise ValueError(f"unknown evidence_vqa config {config!r}")
    if config_overrides:
      if "name" not in config_overrides:
        raise ValueError("name= is required with config overrides")
      config = dataclasses.replace(
          base.get(config, EvidenceVqaConfig(name="x")), **config_overrides
      )
      if "description" not in config_overrides:
        config.description = _describe(config.synthetic)
    else:
      config = base[config]
  builder = EvidenceVqa(
      config=config, data_dir=data_dir, file_format="array_record"
  )
  builder.download_and_prepare()
  return builder


def _describe(cfg: synthetic.SyntheticConfig) -> str:
  sides = sorted({s for size in cfg.image_sizes for s in size})
  px = f"{sides[0]}" if len(sides) == 1 else f"{sides[0]}..{sides[-1]}"
  out = (
      f"{px}-px images, families {', '.join(cfg.families)}, <= "
      f"{cfg.max_distractors} distractors, difficulty {cfg.difficulty}."
  )
  if cfg.prior:
    out += (
        f" Usual answers (prior seed {cfg.prior_seed}) hold on"
        f" {cfg.prior:.0%} of train, validation and test_in_prior."
    )
  return out


# ---------------------------------------------------------------------------
# JSONL.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class JsonlVqaConfig(tfds.core.BuilderConfig):
  """One user dataset: split name -> path (pairs, to stay hashable), and
  the files' format (a name in `formats.FORMATS`)."""

  files: tuple[tuple[str, str], ...] = ()
  format: str = "jsonl"


class JsonlVqa(_Builder):
  """Users' evidence-VQA files (see `faithful_rl.data.formats`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.reports: dict[str, jsonl_lib.JsonlReport] = {}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=jsonl_lib.__doc__,
        features=_features(multi_image=True),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
        split: self._generate_examples(split, path)
        for split, path in self.builder_config.files
    }

  def _generate_examples(self, split: str, path: str):
    report = jsonl_lib.JsonlReport(path)
    self.reports[split] = report
    read = formats.get(self.builder_config.format)
    for i, rec in enumerate(read(path, report)):
      yield i, rec


def build_jsonl(
    files: str | Mapping[str, str],
    data_dir: str,
    name: str | None = None,
    *,
    overwrite: bool = True,
    format: str = "jsonl",  # pylint: disable=redefined-builtin
) -> tuple[JsonlVqa, dict[str, jsonl_lib.JsonlReport]]:
  """Builds `jsonl_vqa/<name>` from users' files.

  Args:
    files: a path (the train split) or {split: path}.
    data_dir: TFDS data directory.
    name: the dataset (builder config) name; default: the first file's
      stem.
    overwrite: rebuild when the dataset exists (else reuse it; the reports
      are then empty).
    format: the files' format, a name in `formats.FORMATS` ("jsonl",
      "parquet", "hf", or one registered).

  Returns:
    The builder and, per split, the `JsonlReport` (bad records, counts).
  """
  if isinstance(files, (str, os.PathLike)):
    files = {"train": os.fspath(files)}
  files = {k: os.path.abspath(v) for k, v in files.items()}
  if name is None:
    first = next(iter(files.values()))
    name = os.path.splitext(os.path.basename(first))[0]
  formats.get(format)  # a clear error for an unknown name, before building
  config = JsonlVqaConfig(
      name=name,
      description=f"{format} files {files}",
      files=tuple(sorted(files.items())),
      format=format,
  )
  builder = JsonlVqa(
      config=config, data_dir=data_dir, file_format="array_record"
  )
  mode = (
      tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
      if overwrite
      else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  )
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(download_mode=mode)
  )
  return builder, dict(builder.reports)


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------


def data_source(name: str, split: str, data_dir: str) -> Any:
  """A random-access source (len, [i]) of a built dataset's split.

  Args:
    name: "evidence_vqa[/config]" or "jsonl_vqa/<name>".
    split: a split name (TFDS slicing such as "train[:100]" works).
    data_dir: the TFDS data directory it was built in.
  """
  return tfds.data_source(name, split=split, data_dir=data_dir)
