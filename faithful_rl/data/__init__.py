"""Data: evidence-VQA datasets, the HF-compatible processor, targets, batches.

    from faithful_rl import data
    data.build_synthetic(data_dir)                    # TFDS evidence_vqa
    source = data.data_source("evidence_vqa", "train", data_dir)
    processor = data.processor_for(hf_dir)            # or demo_tokenizer_dir()
    it = data.BatchIterator(source, processor, batch_size=64,
                            model_config=cfg, seed=0)
    batch = next(it)      # batch.arrays (device pytree), batch.meta (host)

Users' own data: `data.build_jsonl("train.jsonl", data_dir)` (see
`faithful_rl.data.jsonl` for the record format and the bad-record report;
`format="parquet"` / `"hf"` read verl and EasyR1 data, `data.parquet`; a
new format registers itself in `data.formats.FORMATS`).
"""

from faithful_rl.data.batching import Batch
from faithful_rl.data.batching import BatchIterator
from faithful_rl.data.batching import BucketError
from faithful_rl.data.batching import Buckets
from faithful_rl.data.batching import collate
from faithful_rl.data.builders import EvidenceVqa
from faithful_rl.data.builders import EvidenceVqaConfig
from faithful_rl.data.builders import JsonlVqa
from faithful_rl.data.builders import build_jsonl
from faithful_rl.data.builders import build_synthetic
from faithful_rl.data.builders import data_source
from faithful_rl.data.formats import FORMATS
from faithful_rl.data.jsonl import JsonlReport
from faithful_rl.data.jsonl import read_jsonl
from faithful_rl.data.processing import Example
from faithful_rl.data.processing import Processor
from faithful_rl.data.processing import ProcessorOptions
from faithful_rl.data.processing import RecordError
from faithful_rl.data.processing import processor_for
from faithful_rl.data.synthetic import SyntheticConfig
from faithful_rl.data.synthetic import question_only_baseline
from faithful_rl.data.targets import BoxError
from faithful_rl.data.targets import boxes_to_tokens
from faithful_rl.data.targets import counterfactual_image
from faithful_rl.data.targets import ease_target
from faithful_rl.data.targets import evidence_token_mask
from faithful_rl.data.targets import example_targets
from faithful_rl.data.targets import focus_target
from faithful_rl.data.tokenizer import SpecialTokenIds
from faithful_rl.data.tokenizer import demo_tokenizer_dir
from faithful_rl.data.tokenizer import special_token_ids
