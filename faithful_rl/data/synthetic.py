"""Synthetic evidence-grounded VQA: shapes, colours, counts, digits, charts.

Every example is drawn from its own seed, `(seed, split, index)`, so a
split is a pure function of the config and splits never share a seed. A
scene is sampled first (all random choices: objects, positions, answer),
then rendered with Pillow without further randomness; the evidence boxes
are the exact pixel extents of the drawn objects, `[x0, y0, x1, y1]` with
exclusive ends (an object drawn on pixel columns 10..29 has x0=10, x1=30).

Task families (`FAMILIES`):
  count       "How many red circles are there?"            number, 1..4
  attribute   "What colour is the triangle?"               text, 5 colours
  spatial     "Which shape is left of the blue square?"    text, 4 shapes
  exist       "Is there a green diamond?" (POPE-style)     yes_no
  digit       "What number is in the red circle?"          number, 0..9
  arithmetic  "What is the sum of the numbers in the red square and the
               blue circle?"  (two evidence boxes)         number, 0..18
  chart       "What is the value of the green bar?"        number, 1..6

Answers are drawn uniformly per question template, independently of the
question's slots, so the question alone does not reveal the answer
(`question_only_baseline` measures it).

Prior-shortcut variant (`SyntheticConfig.prior` = p > 0). Every question
gets a usual answer, a fixed function of its text (`usual_answer`: for
example each shape has a usual colour, each "How many red circles" a
usual count), and the answer follows it on a share p of the examples,
so a model can score p from the text alone. By split:
  train, validation   the usual answer holds on a p share of each family's
                      examples (exactly ceil(p * n) of the first n), the
                      other examples take one of the other answers
                      uniformly
  test_in_prior       the same distribution, its own seed stream
  test_counter_prior  the usual answer never holds (uniform over the
                      others): a text-only shortcut scores 0 here
  test                answers uniform, exactly the base task's test split
                      (same seed, same records)
A question-only predictor fit on train scores about p on test_in_prior and
0 on test_counter_prior (`question_only_baseline`); a model that reads the
image scores the same on both, so in-prior minus counter-prior accuracy
(the shortcut gap) measures how much of its accuracy the prior supplies.
With p = 0 (the default) there is no prior and only the base splits exist.

Calibration: the defaults (112-px images, objects of 22-42 px, five
well-separated colours, a vocabulary of a few dozen words) are sized so a
tiny model with 4x4 merged visual tokens of 28 px can learn the colour and
count questions.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import zlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from faithful_rl.data.scene import Obj
from faithful_rl.data.scene import Scene
from faithful_rl.data.scene import encode_png
from faithful_rl.data.scene import render

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 47),
    "green": (46, 160, 67),
    "blue": (38, 99, 222),
    "yellow": (240, 200, 30),
    "purple": (140, 70, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond")
LABEL_SHAPES = ("circle", "square")  # shapes wide enough to hold a digit
RELATIONS = ("left of", "right of", "above", "below")
FAMILIES = (
    "count",
    "attribute",
    "spatial",
    "exist",
    "digit",
    "arithmetic",
    "chart",
)
# Split -> seed stream. The prior splits exist when `SyntheticConfig.prior`
# is positive (see the module docstring).
SPLITS = {
    "train": 0,
    "validation": 1,
    "test": 2,
    "test_in_prior": 3,
    "test_counter_prior": 4,
}
PRIOR_SPLITS = ("test_in_prior", "test_counter_prior")
REFERENCE_STYLES = ("reasoning", "question", "answer")

_GAP = 3  # minimum free pixels between two objects
_MARGIN = 2  # minimum free pixels between an object and the image border


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Knobs of the synthetic task.

  Attributes:
    image_sizes: (width, height) choices, one drawn per example.
    families: task families to draw from, cycled by example index.
    max_distractors: most objects besides the ones the question is about.
    difficulty: in [0, 1]; shrinks objects (up to 35%), adds pixel noise to
      the background and jitters object colours.
    max_count: counting answers are 1..max_count.
    max_bar_value: chart answers are 1..max_bar_value.
    prior: the prior-shortcut variant (module docstring): the share p of
      train, validation and test_in_prior examples whose answer is the
      question's usual answer (`usual_answer`); 0 turns the prior off (answers
      uniform, no prior splits).
    prior_seed: picks the table of usual answers (question text -> answer).
    reference_prior: the share q of train examples whose reference response
      (the SFT target) states the question's usual answer, with reasoning
      to match, whatever the image shows: a demonstrator that leans on a
      language prior. The `answer` field, which rewards and evaluation
      check, stays true, and held-out splits keep true references. Works
      with or without `prior`; 0: every reference is right.
    reference_style: what a reference response says before its boxed
      answer: "reasoning", a sentence that states the answer ("The circle
      is red. \\boxed{red}"); "question", the question again, so that the
      answer is stated once ("What colour is the circle? \\boxed{red}");
      "answer", nothing ("\\boxed{red}").
  """

  image_sizes: tuple[tuple[int, int], ...] = ((112, 112),)
  families: tuple[str, ...] = FAMILIES
  max_distractors: int = 2
  difficulty: float = 0.0
  max_count: int = 4
  max_bar_value: int = 6
  prior: float = 0.0
  prior_seed: int = 0
  reference_prior: float = 0.0
  reference_style: str = "reasoning"

  def __post_init__(self):
    unknown = set(self.families) - set(FAMILIES)
    if unknown or not self.families:
      raise ValueError(f"families must be a non-empty subset of {FAMILIES}")
    if not 0.0 <= self.difficulty <= 1.0:
      raise ValueError(f"difficulty={self.difficulty} not in [0, 1]")
    for w, h in self.image_sizes:
      if min(w, h) < 84:
        raise ValueError(f"image size {(w, h)} is below 84 px")
    for name in ("prior", "reference_prior"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name}={getattr(self, name)} not in [0, 1]")
    if self.reference_style not in REFERENCE_STYLES:
      raise ValueError(f"reference_style must be one of {REFERENCE_STYLES}")
    if self.prior and min(map(self.num_answers, self.families)) < 2:
      raise ValueError("a prior needs at least 2 answers in every family")

  def answer_set(self, family: str) -> tuple[str, ...]:
    """The family's possible answers, in the order they are drawn."""
    numbers = lambda lo, hi: tuple(str(n) for n in range(lo, hi + 1))
    return {
        "count": numbers(1, self.max_count),
        "attribute": tuple(COLOURS),
        "spatial": SHAPES,
        "exist": ("no", "yes"),
        "digit": numbers(0, 9),
        "arithmetic": numbers(0, 18),
        "chart": numbers(1, self.max_bar_value),
    }[family]

  def num_answers(self, family: str) -> int:
    """Size of the family's answer set (chance accuracy is its inverse)."""
    return len(self.answer_set(family))


def config_from_dict(knobs: Mapping[str, Any]) -> SyntheticConfig:
  """The `SyntheticConfig` of a config's `data.synthetic` section.

  Keys that are not task knobs (the builder's split sizes) are ignored, and
  lists (as a config read back from JSON holds them) become tuples.
  """
  tuples = (
      lambda v: tuple(map(tuples, v)) if isinstance(v, (list, tuple)) else v
  )
  fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
  return SyntheticConfig(
      **{k: tuples(v) for k, v in knobs.items() if k in fields}
  )


class _Retry(Exception):
  """A required object did not fit; the scene is sampled again."""


# ---------------------------------------------------------------------------
# Placement.
# ---------------------------------------------------------------------------


def _overlaps(a, b, gap: int = 0) -> bool:
  return (
      a[0] < b[2] + gap
      and b[0] < a[2] + gap
      and a[1] < b[3] + gap
      and b[1] < a[3] + gap
  )


def _place(rng, size, width, height, taken, region=None, ok=None, tries=60):
  """A free size x size box inside `region` (default: the image), or None."""
  x_lo, y_lo, x_hi, y_hi = region or (0, 0, width, height)
  x_lo, y_lo = max(x_lo, _MARGIN), max(y_lo, _MARGIN)
  x_hi = min(x_hi, width - _MARGIN) - size
  y_hi = min(y_hi, height - _MARGIN) - size
  if x_hi < x_lo or y_hi < y_lo:
    return None
  for _ in range(tries):
    x = int(rng.integers(x_lo, x_hi + 1))
    y = int(rng.integers(y_lo, y_hi + 1))
    box = (x, y, x + size, y + size)
    if any(_overlaps(box, t, _GAP) for t in taken):
      continue
    if ok is not None and not ok(box):
      continue
    return box
  return None


class _Builder:
  """Collects the objects of one scene."""

  def __init__(self, qrng, rng, cfg: SyntheticConfig, width, height, prior):
    # `q` draws what the question asks and its answer, `rng` the layout:
    # a scene that does not fit is laid out again with the same question,
    # so retries cannot skew the answer distribution.
    self.q, self.rng, self.cfg = qrng, rng, cfg
    self.width, self.height = width, height
    self.prior = prior  # None: uniform; True / False: usual answer or not
    self.objects: list[Obj] = []

  def answer(self, family: str, question: str) -> int:
    """Index of the answer in `cfg.answer_set(family)`."""
    k = self.cfg.num_answers(family)
    if self.prior is None:
      return int(self.q.integers(k))
    usual = _usual_index(self.cfg, family, question)
    if self.prior:
      return usual
    other = int(self.q.integers(k - 1))
    return other + (other >= usual)

  def size(self, lo: float, hi: float) -> int:
    """An object side in pixels; lo/hi are for a 112-px image."""
    scale = min(self.width, self.height) / 112.0
    scale *= 1.0 - 0.35 * self.cfg.difficulty
    return max(8, int(round(self.rng.uniform(lo, hi) * scale)))

  def fill(self, colour: str) -> tuple[int, int, int]:
    base = np.asarray(COLOURS[colour], np.int64)
    jitter = int(round(20 * self.cfg.difficulty))
    if jitter:
      base = base + self.rng.integers(-jitter, jitter + 1, size=3)
    return tuple(int(v) for v in np.clip(base, 0, 255))

  def add(
      self,
      kind,
      colour,
      size,
      *,
      region=None,
      ok=None,
      digit=None,
      required=True,
  ) -> int | None:
    taken = [o.box for o in self.objects]
    box = _place(
        self.rng, size, self.width, self.height, taken, region=region, ok=ok
    )
    if box is None:
      if required:
        raise _Retry()
      return None
    self.objects.append(Obj(kind, colour, box, self.fill(colour), digit))
    return len(self.objects) - 1

  def other_attrs(self, forbidden, shapes=SHAPES) -> tuple[str, str]:
    """A (colour, shape) pair not in `forbidden`."""
    pairs = [(c, s) for c in COLOURS for s in shapes if (c, s) not in forbidden]
    return pairs[int(self.rng.integers(len(pairs)))]

  def distractors(
      self, forbidden, lo, hi, shapes=SHAPES, ok=None, digits=False, count=None
  ) -> None:
    if count is None:
      count = int(self.rng.integers(0, self.cfg.max_distractors + 1))
    for _ in range(count):
      colour, shape = self.other_attrs(forbidden, shapes)
      digit = int(self.rng.integers(10)) if digits else None
      self.add(
          shape, colour, self.size(lo, hi), ok=ok, digit=digit, required=False
      )


def _choice(rng, seq):
  return seq[int(rng.integers(len(seq)))]


def _plural(shape: str, n: int) -> str:
  return shape if n == 1 else shape + "s"


# ---------------------------------------------------------------------------
# Families. Each returns (question, answer, answer_type, evidence, reasoning).
# ---------------------------------------------------------------------------


def _count(b: _Builder):
  colour, shape = _choice(b.q, list(COLOURS)), _choice(b.q, SHAPES)
  q = f"How many {colour} {_plural(shape, 2)} are there?"
  n = 1 + b.answer("count", q)
  ev = [b.add(shape, colour, b.size(22, 28)) for _ in range(n)]
  b.distractors({(colour, shape)}, 22, 28)
  verb = "is" if n == 1 else "are"
  r = f"There {verb} {n} {colour} {_plural(shape, n)}."
  return q, str(n), "number", ev, r


def _attribute(b: _Builder):
  shape = _choice(b.q, SHAPES)
  q = f"What colour is the {shape}?"
  colour = list(COLOURS)[b.answer("attribute", q)]
  ev = [b.add(shape, colour, b.size(26, 34))]
  others = tuple(s for s in SHAPES if s != shape)
  forbidden = {(c, shape) for c in COLOURS}
  b.distractors(forbidden, 24, 30, shapes=others)
  return (
      q,
      colour,
      "text",
      ev,
      f"The {shape} is {colour}.",
  )


def _spatial(b: _Builder):
  rel = _choice(b.q, RELATIONS)
  rc, rs = _choice(b.q, list(COLOURS)), _choice(b.q, SHAPES)
  q = f"Which shape is {rel} the {rc} {rs}?"
  answer = SHAPES[b.answer("spatial", q)]
  tc = b.other_attrs({(rc, rs)}, shapes=(answer,))[0]
  s_ref, s_tgt = b.size(24, 30), b.size(24, 30)
  w, h, room = b.width, b.height, s_tgt + _GAP + _MARGIN
  region = {
      "left of": (room, 0, w, h),
      "right of": (0, 0, w - room, h),
      "above": (0, room, w, h),
      "below": (0, 0, w, h - room),
  }[rel]
  ref = b.add(rs, rc, s_ref, region=region)
  x0, y0, x1, y1 = b.objects[ref].box
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  # The target lies wholly on the named side and overlaps the reference's
  # extent across it; distractors keep their centres on the other side, so
  # exactly one object answers the question.
  j = s_tgt // 3
  if rel in ("left of", "right of"):
    band = (0, y0 - j, x0 - _GAP, y1 + j)
    if rel == "right of":
      band = (x1 + _GAP, y0 - j, w, y1 + j)
  else:
    band = (x0 - j, 0, x1 + j, y0 - _GAP)
    if rel == "below":
      band = (x0 - j, y1 + _GAP, x1 + j, h)
  tgt = b.add(answer, tc, s_tgt, region=band)

  def other_side(box):
    bx, by = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return {
        "left of": bx > cx,
        "right of": bx < cx,
        "above": by > cy,
        "below": by < cy,
    }[rel]

  b.distractors({(rc, rs)}, 22, 28, ok=other_side)
  r = f"The {tc} {answer} is {rel} the {rc} {rs}."
  return q, answer, "text", [ref, tgt], r


def _exist(b: _Builder):
  colour, shape = _choice(b.q, list(COLOURS)), _choice(b.q, SHAPES)
  q = f"Is there a {colour} {shape}?"
  present = bool(b.answer("exist", q))
  total = int(b.rng.integers(1, b.cfg.max_distractors + 2))
  ev = []
  if present:
    ev = [b.add(shape, colour, b.size(24, 30))]
    total -= 1
  # POPE-style adversarial probes: half the time one object shares the
  # probe's colour or its shape, so the absent answer needs both attributes.
  if total and b.rng.integers(2):
    if b.rng.integers(2):
      near = (colour, _choice(b.rng, [s for s in SHAPES if s != shape]))
    else:
      near = (_choice(b.rng, [c for c in COLOURS if c != colour]), shape)
    b.add(near[1], near[0], b.size(24, 30), required=False)
    total -= 1
  b.distractors({(colour, shape)}, 24, 30, count=total)
  word = "yes" if present else "no"
  r = f"I see a {colour} {shape}." if present else f"I see no {colour} {shape}."
  return q, word, "yes_no", ev, r


def _digit(b: _Builder):
  colour, shape = _choice(b.q, list(COLOURS)), _choice(b.q, LABEL_SHAPES)
  q = f"What number is in the {colour} {shape}?"
  d = b.answer("digit", q)
  ev = [b.add(shape, colour, b.size(34, 42), digit=d)]
  b.distractors({(colour, shape)}, 32, 38, shapes=LABEL_SHAPES, digits=True)
  return (
      q,
      str(d),
      "number",
      ev,
      f"The {colour} {shape} shows {d}.",
  )


def _arithmetic(b: _Builder):
  pairs = [(c, s) for c in COLOURS for s in LABEL_SHAPES]
  i, j = b.q.choice(len(pairs), size=2, replace=False)
  (c1, s1), (c2, s2) = pairs[int(i)], pairs[int(j)]
  q = f"What is the sum of the numbers in the {c1} {s1} and the {c2} {s2}?"
  total = b.answer("arithmetic", q)
  a = int(b.q.integers(max(0, total - 9), min(9, total) + 1))
  ev = [
      b.add(s1, c1, b.size(32, 38), digit=a),
      b.add(s2, c2, b.size(32, 38), digit=total - a),
  ]
  b.distractors(
      {(c1, s1), (c2, s2)},
      30,
      36,
      shapes=LABEL_SHAPES,
      digits=True,
      count=int(b.rng.integers(0, min(1, b.cfg.max_distractors) + 1)),
  )
  r = (
      f"The {c1} {s1} shows {a} and the {c2} {s2} shows {total - a}."
      f" {a} + {total - a} = {total}."
  )
  return q, str(total), "number", ev, r


def _chart(b: _Builder):
  w, h, top_v = b.width, b.height, b.cfg.max_bar_value
  n = min(len(COLOURS), 2 + int(b.rng.integers(0, b.cfg.max_distractors + 1)))
  colours = [list(COLOURS)[int(k)] for k in b.rng.permutation(len(COLOURS))]
  colours = colours[:n]
  target = int(b.q.integers(n))
  values = [int(b.rng.integers(1, top_v + 1)) for _ in range(n)]
  q = f"What is the value of the {colours[target]} bar?"
  values[target] = 1 + b.answer("chart", q)
  x0, x1 = int(round(0.12 * w)), w - int(round(0.06 * w))
  base = h - int(round(0.1 * h))
  unit = (base - int(round(0.08 * h))) // top_v
  slot = (x1 - x0) // n
  bar_w = max(6, int(slot * 0.6))
  for k in range(n):
    bx = x0 + k * slot + (slot - bar_w) // 2
    box = (bx, base - values[k] * unit, bx + bar_w, base)
    b.objects.append(Obj("bar", colours[k], box, b.fill(colours[k])))
  c, v = colours[target], values[target]
  chart = (x0, base - top_v * unit, x1, base, unit)
  return (
      q,
      str(v),
      "number",
      [target],
      f"The {c} bar reaches {v}.",
      chart,
  )


_FAMILY_FNS = {
    "count": _count,
    "attribute": _attribute,
    "spatial": _spatial,
    "exist": _exist,
    "digit": _digit,
    "arithmetic": _arithmetic,
    "chart": _chart,
}


def sample_scene(
    rng: np.random.Generator,
    family: str,
    cfg: SyntheticConfig,
    prior: bool | None = None,
) -> Scene:
  """Draws one scene of `family` (every random choice of an example).

  Args:
    rng: the example's generator.
    family: a task family.
    cfg: the task knobs.
    prior: None draws the answer uniformly; True gives the question's usual
      answer (`usual_answer`); False one of the other answers, uniformly.
  """
  width, height = cfg.image_sizes[int(rng.integers(len(cfg.image_sizes)))]
  background = tuple(int(v) for v in rng.integers(232, 256, size=3))
  noise_seed = int(rng.integers(2**31))
  question_seed = int(rng.integers(2**63))
  for _ in range(100):
    b = _Builder(
        np.random.default_rng(question_seed), rng, cfg, width, height, prior
    )
    try:
      out = _FAMILY_FNS[family](b)
    except _Retry:
      continue
    q, answer, answer_type, ev, reasoning = out[:5]
    return Scene(
        width=width,
        height=height,
        background=background,
        noise_seed=noise_seed,
        noise=12.0 * cfg.difficulty,
        objects=tuple(b.objects),
        family=family,
        question=q,
        answer=answer,
        answer_type=answer_type,
        evidence=tuple(ev),
        reasoning=reasoning,
        chart=out[5] if len(out) > 5 else None,
    )
  raise RuntimeError(
      f"could not place a {family} scene in {width}x{height} px; use larger"
      " images or fewer distractors"
  )


# ---------------------------------------------------------------------------
# Records and splits.
# ---------------------------------------------------------------------------


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of one example; splits draw from disjoint seed streams."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r} not in {tuple(SPLITS)}")
  return np.random.default_rng([seed, SPLITS[split], index])


def _usual_index(cfg: SyntheticConfig, family: str, question: str) -> int:
  words = _SLOT_RE.findall(question)
  c = [list(COLOURS).index(w) for w in words if w in COLOURS]
  s = [SHAPES.index(w.rstrip("s")) for w in words if w.rstrip("s") in SHAPES]
  r = [RELATIONS.index(w) for w in words if w in RELATIONS]
  digit = lambda k: (c[k] + 5 * s[k]) % 10
  code = {
      "attribute": lambda: s[0],
      "count": lambda: c[0] + s[0],
      "exist": lambda: c[0] + s[0],
      "spatial": lambda: r[0] + c[0] + s[0],
      "digit": lambda: digit(0),
      "arithmetic": lambda: digit(0) + digit(1),
      "chart": lambda: c[0],
  }[family]()
  return (code + cfg.prior_seed) % cfg.num_answers(family)


def usual_answer(cfg: SyntheticConfig, family: str, question: str) -> str:
  """The question's usual answer in the prior-shortcut variant.

  A fixed function of the question's slot words, with colours, shapes and
  relations numbered in the order of `COLOURS`, `SHAPES` and `RELATIONS`
  (c, s, r): the answer with index (code + prior_seed) mod K in
  `cfg.answer_set(family)`, code being

    attribute   s           circle red, square green, triangle blue,
                            diamond yellow
    count       c + s       red circles 1, green circles 2, red squares 2 ...
    exist       c + s       even: no, odd: yes
    spatial     r + c + s
    digit       c + 5 s     red circle 0 ... purple circle 4, red square 5 ...
    arithmetic  the sum of the two shapes' usual digits
    chart       c           red bar 1, green bar 2 ...

  (the examples are for prior_seed 0). Every question of a family thus has
  one usual answer, and each answer is the usual answer of about as many
  questions as any other (exactly, but for arithmetic's sums and chart's
  top value).
  """
  return cfg.answer_set(family)[_usual_index(cfg, family, question)]


def prior_holds(cfg: SyntheticConfig, split: str, index: int) -> bool | None:
  """Whether example `index` of `split` takes its question's usual answer.

  None: no prior (answers uniform), on every split when `cfg.prior` is 0
  and on `test` always. On train, validation and test_in_prior the prior
  holds on exactly ceil(p * n) of each family's first n examples, spread
  evenly over the indices (a Bresenham pattern, so every prefix of a split
  keeps the share); on test_counter_prior it never holds.
  """
  if split not in SPLITS:
    raise ValueError(f"split {split!r} not in {tuple(SPLITS)}")
  if split in PRIOR_SPLITS and not cfg.prior:
    raise ValueError(f"split {split!r} needs a prior (SyntheticConfig.prior)")
  if not cfg.prior or split == "test":
    return None
  if split == "test_counter_prior":
    return False
  # Exact integer arithmetic: ceil(j * p) with p as a fraction of 10^6.
  scale = 10**6
  p = round(cfg.prior * scale)
  j = index // len(cfg.families)  # the example's index within its family
  ceil = lambda n: -(-n * p // scale)
  return ceil(j + 1) > ceil(j)


def make_scene(
    cfg: SyntheticConfig, seed: int, split: str, index: int
) -> Scene:
  family = cfg.families[index % len(cfg.families)]
  prior = prior_holds(cfg, split, index)
  scene = sample_scene(example_rng(seed, split, index), family, cfg, prior)
  if split == "train" and cfg.reference_prior:
    # The biased demonstrator's coin has its own stream, so that turning it
    # on changes no image, question or answer.
    coin = np.random.default_rng([seed, SPLITS[split], index, 1]).random()
    if coin < cfg.reference_prior and prior is not True:
      # The same example drawn with its usual answer: the same question,
      # and reasoning consistent with that answer.
      usual = sample_scene(example_rng(seed, split, index), family, cfg, True)
      if usual.answer != scene.answer:
        scene = dataclasses.replace(
            scene, demonstration=(usual.reasoning, usual.answer)
        )
  if cfg.reference_style != "reasoning":
    lead = scene.question if cfg.reference_style == "question" else ""
    demo = scene.demonstration
    scene = dataclasses.replace(
        scene, reasoning=lead, demonstration=demo and (lead, demo[1])
    )
  return scene


def scene_record(scene: Scene, example_id: str) -> dict[str, Any]:
  """A dataset record (see the module docstring of `faithful_rl.data`)."""
  return {
      "id": example_id,
      "image": encode_png(render(scene)),
      "question": scene.question,
      "answer": scene.answer,
      "answer_type": scene.answer_type,
      "boxes": scene.boxes,
      "box_labels": scene.box_labels,
      "family": scene.family,
      "reference_response": scene.reference_response,
  }


def generate(
    cfg: SyntheticConfig,
    split: str,
    num_examples: int,
    seed: int = 0,
    start: int = 0,
) -> Iterator[dict[str, Any]]:
  """Records `start .. start + num_examples - 1` of `split`, in order."""
  for i in range(start, start + num_examples):
    yield scene_record(make_scene(cfg, seed, split, i), f"{split}-{i:07d}")


def corpus(
    cfg: SyntheticConfig = SyntheticConfig(),
    num_examples: int = 3000,
    seed: int = 0,
) -> list[str]:
  """Questions and reference responses (no rendering), for tokenizers."""
  texts = []
  for i in range(num_examples):
    scene = make_scene(cfg, seed, "train", i)
    texts += [scene.question, scene.reference_response]
  return texts


# ---------------------------------------------------------------------------
# Question-only baseline.
# ---------------------------------------------------------------------------

_SLOT_WORDS = (
    list(COLOURS) + list(SHAPES) + [s + "s" for s in SHAPES] + list(RELATIONS)
)
_SLOT_RE = re.compile(
    r"\b(" + "|".join(sorted(_SLOT_WORDS, key=len)[::-1]) + r")\b"
)


def question_template(question: str) -> str:
  """The question with its slot words (colours, shapes, relations) blanked."""
  return _SLOT_RE.sub("_", question)


def question_only_baseline(
    train: Sequence[tuple[str, str, str]],
    test: Sequence[tuple[str, str, str]],
    cfg: SyntheticConfig = SyntheticConfig(),
) -> dict[str, Any]:
  """Accuracy of predicting the majority training answer of each question.

  The predictor looks only at the question: the majority answer of the
  exact question string in `train`, else of its template
  (`question_template`). Ties break towards the smallest answer string.

  Args:
    train: (family, question, answer) triples to fit on.
    test: (family, question, answer) triples to score.
    cfg: the config (for each family's number of answers).

  Returns:
    accuracy, chance (the mean of 1 / number of answers of each test
    example's family: the best any question-only predictor can do in
    expectation when answers are uniform and independent of the question)
    and the per-family accuracy.
  """

  def majority(counter):
    return min(counter.items(), key=lambda kv: (-kv[1], kv[0]))[0]

  by_q = collections.defaultdict(collections.Counter)
  by_t = collections.defaultdict(collections.Counter)
  for _, q, a in train:
    by_q[q][a] += 1
    by_t[question_template(q)][a] += 1
  hits = collections.Counter()
  seen = collections.Counter()
  chance = 0.0
  for family, q, a in test:
    counts = by_q.get(q) or by_t.get(question_template(q))
    guess = majority(counts) if counts else ""
    hits[family] += guess == a
    seen[family] += 1
    chance += 1.0 / cfg.num_answers(family)
  n = max(1, sum(seen.values()))
  return {
      "accuracy": sum(hits.values()) / n,
      "chance": chance / n,
      "per_family": {f: hits[f] / seen[f] for f in sorted(seen)},
  }


def qa_triples(
    cfg: SyntheticConfig, split: str, num_examples: int, seed: int = 0
) -> list[tuple[str, str, str]]:
  """(family, question, answer) of a split's first examples (no rendering)."""
  out = []
  for i in range(num_examples):
    s = make_scene(cfg, seed, split, i)
    out.append((s.family, s.question, s.answer))
  return out
