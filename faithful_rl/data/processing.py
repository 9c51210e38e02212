"""Records -> processed examples, exactly as the HF Qwen2.5-VL processor does.

`processor_for(hf_dir)` wraps the checkpoint's own tokenizer and chat
template (`transformers.AutoTokenizer`) and the HF Qwen2-VL image processor
(its PIL backend: the fast one needs torchvision), configured from the
checkpoint's `preprocessor_config.json`. `Processor.process(record)` then
gives one `Example`: the chat-templated prompt ids with each image expanded
to `<|vision_start|>` + n x `<|image_pad|>` + `<|vision_end|>`, the image
patches, and the attention-supervision targets over the example's merged
visual tokens, plus the counterfactual (evidence-masked) patches and the
reference response ids for SFT.

A record is a dict (bytes or str values; TFDS gives bytes):
  id, question, answer, answer_type?, image (encoded bytes) or images
  (a list of them; also PIL images, uint8 arrays or paths), boxes?
  float[n, 4] (pixels, or normalized if all in [0, 1]), box_labels?,
  box_image? (index of the image the boxes refer to, default 0),
  reference_response?, family?.

Axis alphabet: P patches (4 per visual token), V visual tokens, M images.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from faithful_rl.data import targets as targets_lib
from faithful_rl.data import tokenizer as tok_lib


@dataclasses.dataclass(frozen=True)
class ProcessorOptions:
  """Processing switches (every open choice of docs/methods.md is one).

  Attributes:
    system_prompt: the system message; None keeps the chat template's
      default (Qwen2.5-VL: "You are a helpful assistant.").
    instruction: appended to the question (after a newline) to fix the
      answer format; "" for none.
    focus_token: begin the response with `<Focus>` (Faithful-MR1's
      anchoring token, docs/methods.md section 4).
    sigma_scale: EASE Gaussian sigma as a fraction of the box side.
    ease_alpha: EASE uniform smoothing.
    focus_alpha: smoothing of the `<Focus>` anchoring target.
    counterfactual_fill: 'mean' | 'black' | 'gray' | 'blur'.
    blur_radius: Gaussian radius (px) for counterfactual_fill='blur'.
    min_pixels: overrides preprocessor_config.json's min_pixels.
    max_pixels: overrides preprocessor_config.json's max_pixels.
  """

  system_prompt: str | None = None
  instruction: str = tok_lib.DEFAULT_INSTRUCTION
  focus_token: bool = False
  sigma_scale: float = 0.25
  ease_alpha: float = 0.1
  focus_alpha: float = 0.0
  counterfactual_fill: str = "mean"
  blur_radius: float = 8.0
  min_pixels: int | None = None
  max_pixels: int | None = None


@dataclasses.dataclass
class Example:
  """One processed example (host numpy arrays).

  Attributes:
    id: the record id.
    prompt_ids: int32[Tp], chat-templated prompt ending with the assistant
      generation prompt, image tokens expanded.
    pixel_values: float32[P, patch_dim], the images' patches in order.
    cf_pixel_values: float32[P, patch_dim], the same with the evidence
      tokens' cells masked (equal to pixel_values where nothing is masked).
    image_grid_thw: int64[M, 3] patch grid (t, h, w) of each image.
    ease_target: float32[V], sums to 1 (docs/methods.md section 3).
    focus_target: float32[V], sums to 1 (docs/methods.md section 4).
    evidence_mask: bool[V], visual tokens covered by the boxes.
    has_boxes: whether the example has evidence boxes.
    response_ids: int32[Tr], reference response ending in `<|im_end|>`
      (first `<Focus>` when the processor's focus_token is on).
    boxes_tok: float32[n, 4], boxes in token units of image `box_image`.
    box_image: the image the boxes refer to.
    answer: the ground-truth answer string.
    answer_type: 'number' | 'choice' | 'yes_no' | 'text'.
    family: the task family ('' when unknown).
    num_clipped_boxes: boxes clipped because partly outside the image.
    resized_sizes: (H, W) of each image after the processor's resize.
  """

  id: str
  prompt_ids: np.ndarray
  pixel_values: np.ndarray
  cf_pixel_values: np.ndarray
  image_grid_thw: np.ndarray
  ease_target: np.ndarray
  focus_target: np.ndarray
  evidence_mask: np.ndarray
  has_boxes: bool
  response_ids: np.ndarray
  boxes_tok: np.ndarray
  box_image: int
  answer: str
  answer_type: str
  family: str = ""
  num_clipped_boxes: int = 0
  resized_sizes: tuple[tuple[int, int], ...] = ()

  @property
  def num_patches(self) -> int:
    return int(self.pixel_values.shape[0])

  @property
  def num_visual_tokens(self) -> int:
    return int(self.ease_target.shape[0])

  @property
  def grids(self) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in g) for g in self.image_grid_thw]


class RecordError(ValueError):
  """A record that cannot be processed; the message names it."""


def text(value) -> str:
  """A str from a str, bytes (UTF-8) or numpy scalar."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return str(value)


def infer_answer_type(answer: str) -> str:
  """'yes_no' for yes/no, 'number' for a number, else 'text'."""
  a = answer.strip().lower()
  if a in ("yes", "no"):
    return "yes_no"
  try:
    float(a.replace(",", ""))
    return "number"
  except ValueError:
    return "text"


def load_image(value) -> Image.Image:
  """A PIL image from encoded bytes, a path, a uint8 array or a PIL image."""
  if isinstance(value, Image.Image):
    return value
  if isinstance(value, np.ndarray):
    if value.ndim == 0:  # a numpy scalar holding bytes (TFDS object tensor)
      value = value.item()
    elif value.dtype == np.uint8:
      return Image.fromarray(value)
  if isinstance(value, (bytes, bytearray, memoryview)):
    img = Image.open(io.BytesIO(bytes(value)))
  elif isinstance(value, (str, os.PathLike)):
    img = Image.open(value)
  else:
    raise TypeError(f"cannot read an image from {type(value).__name__}")
  img.load()
  return img


def record_images(record: Mapping[str, Any]) -> list[Any]:
  if "images" in record and record["images"] is not None:
    images = list(record["images"])
  elif "image" in record:
    images = [record["image"]]
  else:
    raise KeyError("the record has neither 'image' nor 'images'")
  return images


class Processor:
  """Turns records into `Example`s (see the module docstring).

  Attributes:
    tokenizer: the `transformers` tokenizer (with a chat template).
    image_processor: the HF `Qwen2VLImageProcessorPil`.
    options: `ProcessorOptions`.
    ids: `SpecialTokenIds` of the tokenizer.
    model_config: the checkpoint's `ModelConfig` when known (checked for
      consistency with the tokenizer and image processor).
  """

  def __init__(
      self, tokenizer, image_processor, options=None, model_config=None
  ):
    self.tokenizer = tokenizer
    self.image_processor = image_processor
    self.options = options or ProcessorOptions()
    self.ids = tok_lib.special_token_ids(tokenizer)
    self.model_config = model_config
    if self.options.counterfactual_fill not in targets_lib.FILLS:
      raise ValueError(
          f"counterfactual_fill={self.options.counterfactual_fill!r} not in"
          f" {targets_lib.FILLS}"
      )
    if self.options.focus_token and self.ids.focus is None:
      raise ValueError(
          "focus_token=True but the tokenizer has no <Focus> token; add it"
          " (tokenizer.add_special_tokens) and resize the embeddings"
      )
    if getattr(tokenizer, "chat_template", None) is None:
      raise ValueError("the tokenizer has no chat template")
    if model_config is not None:
      self._check_model(model_config)

  # -- geometry -------------------------------------------------------------

  @property
  def patch_size(self) -> int:
    return int(self.image_processor.patch_size)

  @property
  def merge_size(self) -> int:
    return int(self.image_processor.merge_size)

  @property
  def token_pixels(self) -> int:
    """Side of one merged visual token in pixels (28 for Qwen2.5-VL)."""
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    ip = self.image_processor
    return 3 * int(ip.temporal_patch_size) * self.patch_size**2

  @property
  def response_prefix_ids(self) -> list[int]:
    """Ids every response starts with (`<Focus>` when it is on)."""
    return [self.ids.focus] if self.options.focus_token else []

  def _check_model(self, cfg) -> None:
    if cfg.image_token_id != self.ids.image_pad:
      raise ValueError(
          f"model image_token_id={cfg.image_token_id} but the tokenizer's"
          f" <|image_pad|> is {self.ids.image_pad}"
      )
    v = cfg.vision
    if (v.patch_size, v.spatial_merge_size) != (
        self.patch_size,
        self.merge_size,
    ):
      raise ValueError(
          f"model patch/merge {v.patch_size}/{v.spatial_merge_size} differ"
          f" from preprocessor_config.json's {self.patch_size}/"
          f"{self.merge_size}"
      )
    if cfg.text.vocab_size < len(self.tokenizer):
      raise ValueError(
          f"model vocab_size={cfg.text.vocab_size} is smaller than the"
          f" tokenizer's {len(self.tokenizer)} tokens"
      )

  def resized_size(self, height: int, width: int) -> tuple[int, int]:
    """(H, W) the image processor resizes an image of (height, width) to."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # pylint: disable=g-import-not-at-top

    size = self.image_processor.size
    return smart_resize(
        height,
        width,
        factor=self.token_pixels,
        min_pixels=size["shortest_edge"],
        max_pixels=size["longest_edge"],
    )

  def resize(self, image) -> np.ndarray:
    """The processor's RGB conversion and resize: uint8[H, W, 3]."""
    from transformers.image_transforms import convert_to_rgb  # pylint: disable=g-import-not-at-top

    rgb = convert_to_rgb(load_image(image), return_numpy=True)
    height, width = rgb.shape[:2]
    rh, rw = self.resized_size(height, width)
    if (rh, rw) == (height, width):
      return rgb
    pil = Image.fromarray(rgb).resize(
        (rw, rh), resample=self.image_processor.resample
    )
    return np.asarray(pil)

  def patches(
      self, resized: Sequence[np.ndarray]
  ) -> tuple[np.ndarray, np.ndarray]:
    """HF's rescale, normalize and patchify of resized images.

    Returns:
      float32[P, patch_dim] and int64[M, 3] image_grid_thw.
    """
    out = self.image_processor(
        images=[Image.fromarray(r) for r in resized],
        do_resize=False,
        return_tensors="np",
    )
    return (
        np.asarray(out["pixel_values"], np.float32),
        np.asarray(out["image_grid_thw"], np.int64),
    )

  # -- text -----------------------------------------------------------------

  def messages(self, question: str, num_images: int) -> list[dict[str, Any]]:
    """The chat: optional system message, then images and the question."""
    prompt = question
    if self.options.instruction:
      prompt = f"{question}\n{self.options.instruction}"
    content = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": prompt})
    msgs = []
    if self.options.system_prompt is not None:
      msgs.append({"role": "system", "content": self.options.system_prompt})
    msgs.append({"role": "user", "content": content})
    return msgs

  def prompt_text(self, question: str, num_images: int) -> str:
    """Chat-templated prompt, one `<|image_pad|>` per image (unexpanded)."""
    return self.tokenizer.apply_chat_template(
        self.messages(question, num_images),
        tokenize=False,
        add_generation_prompt=True,
    )

  def prompt_ids(self, question: str, tokens_per_image: Sequence[int]):
    """int32[Tp] prompt ids with image `k` expanded to its visual tokens."""
    ids = self.tokenizer(self.prompt_text(question, len(tokens_per_image)))[
        "input_ids"
    ]
    ids = np.asarray(ids, np.int32)
    pads = np.flatnonzero(ids == self.ids.image_pad)
    if len(pads) != len(tokens_per_image):
      raise ValueError(
          f"the chat template produced {len(pads)} <|image_pad|> tokens for"
          f" {len(tokens_per_image)} images"
      )
    # Tokenizing the text with each placeholder repeated n times (what HF's
    # processor does) splits on special tokens, so repeating ids is equal.
    repeats = np.ones_like(ids)
    repeats[pads] = tokens_per_image
    return np.repeat(ids, repeats)

  def response_ids(self, response: str) -> np.ndarray:
    """int32[Tr]: optional `<Focus>`, the response, `<|im_end|>`."""
    body = self.tokenizer(response, add_special_tokens=False)["input_ids"]
    return np.asarray(
        self.response_prefix_ids + list(body) + [self.ids.im_end], np.int32
    )

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode(
        [int(i) for i in ids], skip_special_tokens=skip_special_tokens
    )

  def decode_responses(self, tokens, mask) -> list[str]:
    """Texts of sampled responses: int[N, R] tokens where bool[N, R] mask."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    return [
        self.decode(tokens[i][mask[i]], skip_special_tokens=True)
        for i in range(tokens.shape[0])
    ]

  # -- records --------------------------------------------------------------

  def process(self, record: Mapping[str, Any]) -> Example:
    """One record -> `Example`; raises `RecordError` naming the record."""
    rid = text(record.get("id", "?"))
    try:
      return self._process(rid, record)
    except (targets_lib.BoxError, RecordError):
      raise
    except (ValueError, KeyError, TypeError, OSError) as e:
      raise RecordError(f"record {rid!r}: {e}") from e

  __call__ = process

  def _process(self, rid: str, record: Mapping[str, Any]) -> Example:
    opts = self.options
    images = record_images(record)
    if not images:
      raise RecordError(f"record {rid!r}: no images")
    originals, resized = [], []
    for image in images:
      pil = load_image(image)
      originals.append((pil.height, pil.width))
      resized.append(self.resize(pil))
    s = self.token_pixels
    grids_hw = [(r.shape[0] // s, r.shape[1] // s) for r in resized]
    box_image = int(np.asarray(record.get("box_image", 0)))
    if not 0 <= box_image < len(images):
      raise RecordError(
          f"record {rid!r}: box_image={box_image} but it has"
          f" {len(images)} images"
      )
    boxes = record.get("boxes")
    boxes = np.zeros((0, 4)) if boxes is None else np.asarray(boxes)
    boxes_tok, num_clipped = targets_lib.boxes_to_tokens(
        boxes,
        originals[box_image],
        resized[box_image].shape[:2],
        s,
        record_id=rid,
    )
    tg = targets_lib.example_targets(
        boxes_tok,
        grids_hw,
        box_image,
        sigma_scale=opts.sigma_scale,
        ease_alpha=opts.ease_alpha,
        focus_alpha=opts.focus_alpha,
    )
    has_boxes = bool(tg["has_boxes"])
    to_patch = list(resized)
    if has_boxes:
      gh, gw = grids_hw[box_image]
      covered = targets_lib.evidence_token_mask(boxes_tok, gh, gw)
      cf_image = targets_lib.counterfactual_image(
          resized[box_image],
          covered,
          opts.counterfactual_fill,
          token_pixels=s,
          blur_radius=opts.blur_radius,
      )
      # Only the covered cells change: patchify just those, side by side in
      # one s x (s * k) strip, whose merge groups come out in cell order.
      cells = np.flatnonzero(covered)
      to_patch.append(
          np.concatenate(
              [
                  cf_image[r * s : (r + 1) * s, c * s : (c + 1) * s]
                  for r, c in zip(cells // gw, cells % gw)
              ],
              axis=1,
          )
      )
    pixel_values, grid_thw = self.patches(to_patch)
    sizes = [int(np.prod(g)) for g in grid_thw]
    n = sum(sizes[: len(resized)])
    cf_pixel_values = pixel_values[:n]
    if has_boxes:
      unit = self.merge_size**2
      start = sum(sizes[:box_image]) // unit
      groups = cf_pixel_values.copy().reshape(-1, unit, self.patch_dim)
      groups[start + cells] = pixel_values[n:].reshape(-1, unit, self.patch_dim)
      cf_pixel_values = groups.reshape(n, self.patch_dim)
    pixel_values, grid_thw = pixel_values[:n], grid_thw[: len(resized)]

    question = text(record["question"])
    answer = text(record["answer"])
    answer_type = text(record.get("answer_type") or "") or infer_answer_type(
        answer
    )
    reference = text(record.get("reference_response") or "")
    if not reference:
      reference = f"\\boxed{{{answer}}}"
    tokens_per_image = [gh * gw for gh, gw in grids_hw]
    return Example(
        id=rid,
        prompt_ids=self.prompt_ids(question, tokens_per_image),
        pixel_values=pixel_values,
        cf_pixel_values=cf_pixel_values,
        image_grid_thw=grid_thw,
        ease_target=tg["ease_target"],
        focus_target=tg["focus_target"],
        evidence_mask=tg["evidence_mask"],
        has_boxes=has_boxes,
        response_ids=self.response_ids(reference),
        boxes_tok=boxes_tok,
        box_image=box_image,
        answer=answer,
        answer_type=answer_type,
        family=text(record.get("family") or ""),
        num_clipped_boxes=num_clipped,
        resized_sizes=tuple((r.shape[0], r.shape[1]) for r in resized),
    )


# ---------------------------------------------------------------------------
# Construction.
# ---------------------------------------------------------------------------

_IMAGE_PROCESSOR_KEYS = (
    "size",
    "min_pixels",
    "max_pixels",
    "patch_size",
    "temporal_patch_size",
    "merge_size",
    "image_mean",
    "image_std",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "do_convert_rgb",
    "resample",
)


def image_processor_from(hf_dir: str, min_pixels=None, max_pixels=None):
  """HF's PIL `Qwen2VLImageProcessorPil` from `preprocessor_config.json`."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # pylint: disable=g-import-not-at-top

  path = os.path.join(hf_dir, "preprocessor_config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found")
  with open(path) as f:
    raw = json.load(f)
  kwargs = {k: raw[k] for k in _IMAGE_PROCESSOR_KEYS if k in raw}
  if min_pixels is not None:
    kwargs["min_pixels"] = min_pixels
  if max_pixels is not None:
    kwargs["max_pixels"] = max_pixels
  return Qwen2VLImageProcessorPil(**kwargs)


def _chat_template_file(hf_dir: str) -> str | None:
  jinja = os.path.join(hf_dir, "chat_template.jinja")
  if os.path.isfile(jinja):
    with open(jinja) as f:
      return f.read()
  js = os.path.join(hf_dir, "chat_template.json")
  if os.path.isfile(js):
    with open(js) as f:
      return json.load(f).get("chat_template")
  return None


def processor_for(hf_dir_or_config, *, model_config=None, **options):
  """A `Processor` for a HF checkpoint (or tokenizer) directory.

  Args:
    hf_dir_or_config: a local directory with the tokenizer files,
      `preprocessor_config.json` and optionally `config.json` (e.g.
      `demo_tokenizer_dir()`), or a mapping / ml_collections ConfigDict
      with key `hf_dir` and any `ProcessorOptions` fields.
    model_config: the model's `ModelConfig`; read from `config.json` when
      the directory has one.
    **options: `ProcessorOptions` fields, overriding the config's.
  """
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  if isinstance(hf_dir_or_config, (str, os.PathLike)):
    hf_dir, cfg = os.fspath(hf_dir_or_config), {}
  else:
    cfg = hf_dir_or_config
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    hf_dir = cfg.pop("hf_dir", None)
    if hf_dir is None:
      raise ValueError("the processor config needs an 'hf_dir'")
  cfg.update(options)
  opts = ProcessorOptions(**cfg)
  tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
  if getattr(tokenizer, "chat_template", None) is None:
    tokenizer.chat_template = _chat_template_file(hf_dir)
  image_processor = image_processor_from(
      hf_dir, opts.min_pixels, opts.max_pixels
  )
  if model_config is None and os.path.isfile(
      os.path.join(hf_dir, "config.json")
  ):
    from faithful_rl.models.config import read_config  # pylint: disable=g-import-not-at-top

    model_config = read_config(hf_dir)
  return Processor(tokenizer, image_processor, opts, model_config)
