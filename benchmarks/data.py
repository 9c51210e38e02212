r"""Data pipeline throughput on CPU: processed examples per second.

  python benchmarks/data.py [--num=256] [--batch_size=32]

Measures, single-threaded:
  * synthetic: rendering records (Pillow + PNG), processing them with the
    demo processor (decode, resize, patchify, chat template, targets,
    counterfactual), and the whole `BatchIterator` (processing + collation)
    over an `evidence_vqa` TFDS data source;
  * JSONL: 448x448 PNGs written with a JSONL file into a temp dir, built
    into `jsonl_vqa` and processed at the demo's max_pixels (224x224, 64
    visual tokens) and at 448x448 (256 visual tokens).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

from faithful_rl import data
from faithful_rl.data import synthetic
from faithful_rl.models.config import ModelConfig
from faithful_rl.models.config import TextConfig
from faithful_rl.models.config import VisionConfig


def rate(fn, items) -> float:
  start = time.perf_counter()
  for item in items:
    fn(item)
  return len(items) / (time.perf_counter() - start)


def iterator_rate(source, processor, config, batch_size, buckets) -> float:
  it = data.BatchIterator(
      source,
      processor,
      batch_size=batch_size,
      model_config=config,
      buckets=buckets,
      num_epochs=1,
  )
  start, n = time.perf_counter(), 0
  for batch in it:
    n += len(batch.meta["ids"])
  return n / (time.perf_counter() - start)


def demo_model_config(processor) -> ModelConfig:
  """A small config whose token ids and vision geometry match the demo."""
  return ModelConfig(
      text=TextConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2),
      vision=VisionConfig(depth=2, hidden_size=64, out_hidden_size=64),
      **processor.ids.model_config_kwargs(),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=32)
  args = parser.parse_args()
  logging.getLogger("absl").setLevel(logging.ERROR)
  logging.getLogger("faithful_rl").setLevel(logging.ERROR)
  n, bs = args.num, args.batch_size

  demo = data.processor_for(data.demo_tokenizer_dir())
  config = demo_model_config(demo)
  buckets = data.Buckets(prompt=(64, 128, 384), patches=(64, 256, 1024))
  print(f"CPU, 1 thread, {n} examples per measurement")

  with tempfile.TemporaryDirectory() as tmp:
    # Synthetic (112 px: 16 visual tokens).
    cfg = synthetic.SyntheticConfig()
    make = lambda i: synthetic.scene_record(  # pylint: disable=g-long-lambda
        synthetic.make_scene(cfg, 0, "train", i), str(i)
    )
    print(f"synthetic  render records        {rate(make, range(n)):8.1f} ex/s")
    records = [make(i) for i in range(n)]
    print(f"synthetic  process (112 px)      {rate(demo, records):8.1f} ex/s")
    data.build_synthetic(
        tmp,
        "default",
        name="bench",
        num_train=n,
        num_validation=0,
        num_test=0,
    )
    src = data.data_source("evidence_vqa/bench", "train", tmp)
    r = iterator_rate(src, demo, config, bs, buckets)
    print(f"synthetic  tfds -> batches       {r:8.1f} ex/s (batch {bs})")

    # JSONL of 448x448 PNGs.
    big = synthetic.SyntheticConfig(image_sizes=((448, 448),))
    os.makedirs(os.path.join(tmp, "img"))
    path = os.path.join(tmp, "big.jsonl")
    with open(path, "w") as f:
      for i in range(n):
        scene = synthetic.make_scene(big, 0, "test", i)
        name = f"img/{i:05d}.png"
        with open(os.path.join(tmp, name), "wb") as img:
          img.write(synthetic.encode_png(synthetic.render(scene)))
        rec = dict(
            id=f"j{i}",
            images=[name],
            question=scene.question,
            answer=scene.answer,
            boxes=scene.boxes.tolist(),
        )
        f.write(json.dumps(rec) + "\n")
    start = time.perf_counter()
    data.build_jsonl(path, tmp, name="big")
    print(
        "jsonl      build 448 px         "
        f"{n / (time.perf_counter() - start):8.1f} ex/s"
    )
    src = data.data_source("jsonl_vqa/big", "train", tmp)
    rows = [src[i] for i in range(n)]
    full = data.processor_for(data.demo_tokenizer_dir(), max_pixels=448 * 448)
    print(f"jsonl      process (-> 224 px)   {rate(demo, rows):8.1f} ex/s")
    print(f"jsonl      process (448 px)      {rate(full, rows):8.1f} ex/s")
    r = iterator_rate(src, full, config, bs, buckets)
    print(f"jsonl      tfds -> batches 448   {r:8.1f} ex/s (batch {bs})")


if __name__ == "__main__":
  main()
