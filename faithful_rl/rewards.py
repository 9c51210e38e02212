"""Verifiable rewards: answer extraction, answer checking, format.

Host-side Python over decoded strings. Nothing here raises on odd input:
a response that cannot be read scores 0.

Answer types (aliases in `_TYPES`): 'number', 'choice', 'yes_no', 'math'
(symbolic equivalence through `math_verify`), 'text' (normalised exact
match); None (or an unknown name) infers the type from the gold answer.

Rules chosen where graders differ:
* The last `\\boxed{...}` wins (braces nested to any depth).
* Numbers compare as exact rationals up to an absolute 1e-6 (so 0.75 ==
  3/4 == \\frac{3}{4}, and 0.3333333 == 1/3, but 0.33 != 1/3). Thousands
  separators (1,000), a leading sign, `$`, `\\!`, `{,}` and one trailing
  unit word ('12 apples', '5 cm') are accepted.
* Percentages: a side written with '%' may equal either its number or its
  number / 100, so '50%' matches both '50' and '0.5' (as `math_verify`
  does); two bare numbers never get the factor 100 ('50' != '0.5').

Rewards by name (`rl.rewards`, summed with `rl.reward_weights`): each
term is a function in `REWARDS`, `fn(responses: Responses, spec,
**options) -> float32[N]`, where `spec` is the step's `rl.rounds.Spec`
and `options` its `rl.reward_options.<name>` block. Built in: "correct"
(`verify`), "format" (`format_reward`), "overlong" (DAPO's length
shaping, when `rl.overlong='shaping'`). A new reward is one file:

  from faithful_rl import rewards

  @rewards.REWARDS.register("brevity")
  def brevity(responses, spec, *, per_token=0.01):
    return -per_token * responses.lengths.astype(np.float32)

  # --config.rl.rewards='("correct", "brevity")'
  # --config.rl.reward_options.brevity.per_token=0.02
"""

from __future__ import annotations

import dataclasses
import fractions
import re
import threading
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from faithful_rl import registry

_TYPES = {
    "number": "number",
    "numeric": "number",
    "numerical": "number",
    "integer": "number",
    "int": "number",
    "float": "number",
    "count": "number",
    "choice": "choice",
    "multiple_choice": "choice",
    "multi_choice": "choice",
    "mc": "choice",
    "option": "choice",
    "yes_no": "yes_no",
    "yesno": "yes_no",
    "bool": "yes_no",
    "boolean": "yes_no",
    "math": "math",
    "expression": "math",
    "latex": "math",
    "formula": "math",
    "text": "text",
    "string": "text",
    "free_form": "text",
    "open": "text",
}
_LETTERS = "ABCDEFGHIJ"

# ------------------------------------------------------------------------------
# Extraction.
# ------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_ANSWER_RE = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*([^\n]+)", re.I
)
_NUMBER_RE = re.compile(
    r"[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
    r"(?:\s*/\s*\d+(?:\.\d+)?)?%?|[-+\u2212]?\.\d+%?"
)
_CHOICE_PATTERNS = (
    re.compile(r"\(([A-J])\)"),
    re.compile(r"\b(?i:option|choice)\s*:?\s*\(?([A-J])\b"),
    re.compile(r"(?:^|\n)\s*([A-J])[.:)](?:\s|$)"),
)
_LEADING_CHOICE_RES = (
    re.compile(r"\(?([A-J])\)?\.?"),  # the whole string
    re.compile(r"\(([A-J])\).*", re.S),  # '(B) red'
    re.compile(r"([A-J])[.:)](?:\s.*)?", re.S),  # 'B. red', 'B)'
    re.compile(r"(?i:option|choice)\s*:?\s*\(?([A-J])\b.*", re.S),
)
_YES_NO_RE = re.compile(r"\b(yes|no)\b", re.I)


def _balanced(text: str, start: int) -> int | None:
  """Index just past the brace closing the group that opens before `start`."""
  depth, i = 1, start
  while i < len(text):
    ch = text[i]
    if ch == "\\":  # \{ and \} are literal braces
      i += 2
      continue
    if ch == "{":
      depth += 1
    elif ch == "}":
      depth -= 1
      if depth == 0:
        return i + 1
    i += 1
  return None


def _boxed_spans(text: str) -> list[str]:
  """Contents of every complete \\boxed{...} / \\fbox{...}, in order."""
  out = []
  for m in _BOXED_RE.finditer(text):
    end = _balanced(text, m.end())
    if end is not None:
      out.append(text[m.end() : end - 1])
  return out


def _strip_answer(s: str) -> str:
  s = s.strip().strip("*").strip()
  s = re.sub(r"^\$+|\$+$", "", s).strip()
  # A trailing full stop ends the sentence; a decimal point has digits after.
  return re.sub(r"[.。]+$", "", s).strip()


def _choice_letter(s: str) -> str | None:
  """'B', '(B)', 'B.', 'B) red', 'option B' -> 'B'."""
  s = s.strip()
  for pat in _LEADING_CHOICE_RES:
    m = pat.fullmatch(s)
    if m:
      return m.group(1)
  return None


def _last_choice(text: str) -> str | None:
  best = None
  for pat in _CHOICE_PATTERNS:
    for m in pat.finditer(text):
      if best is None or m.start(1) > best[0]:
        best = (m.start(1), m.group(1))
  return best[1] if best else None


def _yes_no(s: str) -> str | None:
  s = unicodedata.normalize("NFKC", s).strip().lower()
  m = re.match(r"\W*(yes|no|true|false)\b", s)
  if not m:
    return None
  return {"true": "yes", "false": "no"}.get(m.group(1), m.group(1))


def _norm_type(answer_type: str | None) -> str | None:
  if answer_type is None:
    return None
  return _TYPES.get(str(answer_type).strip().lower())


def extract_answer(response: Any, answer_type: str | None = None):
  """The answer a response commits to, as a string, or None.

  In order: the last complete `\\boxed{...}`, the last `<answer>...</answer>`,
  the last 'answer is X' / 'Answer: X' line. Failing those, by type: for
  'choice' the last '(B)', 'option B' or 'B.' at a line start; for 'yes_no'
  the last yes/no word; otherwise the last number. With no type, the last
  number, then a choice letter, then yes/no. For 'choice' an extracted
  'B) red' is reduced to 'B'; for 'yes_no' to 'yes' / 'no'.
  """
  if not isinstance(response, str) or not response.strip():
    return None
  kind = _norm_type(answer_type)
  text = unicodedata.normalize("NFKC", response)
  cand = None
  boxes = _boxed_spans(text)
  if boxes:
    cand = boxes[-1]
  else:
    tags = _ANSWER_TAG_RE.findall(text)
    lines = _ANSWER_RE.findall(text)
    if tags:
      cand = tags[-1]
    elif lines:
      cand = lines[-1]
  if cand is not None:
    cand = _strip_answer(cand)
    if kind == "choice":
      return _choice_letter(_clean_latex(cand)) or cand
    if kind == "yes_no":
      return _yes_no(_clean_latex(cand)) or cand
    return cand
  if kind == "choice":
    return _last_choice(text)
  yes_no = _YES_NO_RE.findall(text)
  if kind == "yes_no":
    return yes_no[-1].lower() if yes_no else None
  numbers = _NUMBER_RE.findall(text)
  if numbers:
    return numbers[-1].strip()
  if kind is None:
    letter = _choice_letter(text) or _last_choice(text)
    if letter:
      return letter
    if yes_no:
      return yes_no[-1].lower()
  return None


# ------------------------------------------------------------------------------
# Checking.
# ------------------------------------------------------------------------------

_NUM_BODY = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"


def _clean_latex(s: str) -> str:
  s = unicodedata.normalize("NFKC", s).strip()
  s = s.replace("\u2212", "-").replace("\\%", "%").replace("{,}", ",")
  for tok in ("\\!", "\\,", "\\;", "\\ ", "\\left", "\\right", "\\$", "$"):
    s = s.replace(tok, "")
  s = re.sub(
      r"\\(?:text|mathrm|textbf|mathbf|operatorname)\{([^{}]*)\}", r"\1", s
  )
  s = re.sub(r"\^\{?\\circ\}?|°", "", s)
  return s.strip()


def _parse_number(s: str) -> tuple[fractions.Fraction, bool] | None:
  """(exact value, written with %) of a plain number, or None."""
  s = _clean_latex(s)
  s = re.sub(r"[.。]+$", "", s).strip()
  # One trailing unit word after a space: '12 apples', '5 cm'.
  s = re.sub(r"(?<=\d)\s+[A-Za-z]+\.?$", "", s)
  percent = s.endswith("%")
  s = s.rstrip("%").strip().replace(" ", "")
  sign = 1
  if s[:1] and s[:1] in "+-":
    sign, s = (-1 if s[0] == "-" else 1), s[1:]
  m = re.fullmatch(
      r"\\[dt]?frac\{(" + _NUM_BODY + r")\}\{(" + _NUM_BODY + r")\}", s
  )
  m = m or re.fullmatch(r"\\[dt]?frac(\d)(\d)", s)
  m = m or re.fullmatch(r"(" + _NUM_BODY + r")/(" + _NUM_BODY + r")", s)
  if m:
    num, den = (fractions.Fraction(x.replace(",", "")) for x in m.groups())
    if den == 0:
      return None
    return sign * num / den, percent
  if re.fullmatch(_NUM_BODY, s) or re.fullmatch(
      r"\d+(?:\.\d+)?[eE][+-]?\d+", s
  ):
    return sign * fractions.Fraction(s.replace(",", "")), percent
  return None


def _numbers_equal(gold, pred) -> bool:
  def values(x):
    v, pct = x
    return (v, v / 100) if pct else (v,)

  return any(
      abs(g - p) <= fractions.Fraction(1, 10**6)
      for g in values(gold)
      for p in values(pred)
  )


def _math_verify_equal(gold: str, pred: str) -> bool:
  """Symbolic equivalence with math_verify; False on any failure.

  math_verify's timeouts use SIGALRM, which only works in the main thread;
  elsewhere they are off, and long inputs are refused instead.
  """
  if len(gold) + len(pred) > 1000:
    return False
  try:
    from math_verify import errors as mve
    from math_verify import parse as mv_parse
    from math_verify import verify as mv_verify
  except ImportError:
    return False
  seconds = 5 if threading.current_thread() is threading.main_thread() else None
  try:
    g = mv_parse(f"${gold}$", parsing_timeout=seconds)
    p = mv_parse(f"${pred}$", parsing_timeout=seconds)
    if not g or not p:
      return False
    return bool(mv_verify(g, p, timeout_seconds=seconds))
  # TimeoutException derives from BaseException, so it is named.
  except (Exception, mve.TimeoutException):  # pylint: disable=broad-except
    return False


def _normalize_text(s: str) -> str:
  s = _clean_latex(s).lower()
  s = "".join(" " if unicodedata.category(c).startswith("P") else c for c in s)
  s = re.sub(r"\b(a|an|the)\b", " ", s)
  return " ".join(s.split())


def _infer_type(answer: str) -> str:
  if _yes_no(answer) and len(answer.split()) == 1:
    return "yes_no"
  if re.fullmatch(r"\s*\(?[A-J]\)?\s*", answer):
    return "choice"
  if _parse_number(answer) is not None:
    return "number"
  if re.search(r"[\\^=/+*]|\d", answer):
    return "math"
  return "text"


def _option_text(choices, letter: str) -> str | None:
  if choices is None:
    return None
  if isinstance(choices, Mapping):
    text = choices.get(letter)
  else:
    i = _LETTERS.find(letter)
    text = choices[i] if 0 <= i < len(choices) else None
  if text is None:
    return None
  # Options are sometimes stored as 'B. red'.
  return re.sub(r"^\s*\(?[A-J]\)?\s*[.:)]\s*", "", str(text))


def _verify_choice(pred: str, gold: str, choices) -> bool:
  gold_letter = _choice_letter(gold)
  pred_letter = _choice_letter(pred)
  if gold_letter:
    if pred_letter:
      return pred_letter == gold_letter
    gold_text = _option_text(choices, gold_letter)
    return gold_text is not None and _normalize_text(pred) == _normalize_text(
        gold_text
    )
  gold_n = _normalize_text(gold)
  if pred_letter and choices is not None:
    option = _option_text(choices, pred_letter)
    return option is not None and _normalize_text(option) == gold_n
  return _normalize_text(pred) == gold_n


def _verify(response, answer, answer_type, choices) -> bool:
  if not isinstance(answer, str):
    answer = str(answer)
  kind = _norm_type(answer_type) or _infer_type(answer)
  pred = extract_answer(response, kind)
  if pred is None or not pred.strip():
    return False
  if kind == "choice":
    return _verify_choice(pred, answer, choices)
  if kind == "yes_no":
    return _yes_no(pred) is not None and _yes_no(pred) == _yes_no(answer)
  gold_num, pred_num = _parse_number(answer), _parse_number(pred)
  if gold_num is not None and pred_num is not None:
    return _numbers_equal(gold_num, pred_num)
  if kind == "text":
    return _normalize_text(pred) == _normalize_text(answer)
  # number with a non-plain side (e.g. \sqrt{2}), or math.
  if _normalize_text(pred) == _normalize_text(answer) and kind == "math":
    return True
  return _math_verify_equal(_clean_latex(answer), _clean_latex(pred))


def verify(
    response: str,
    answer: str,
    answer_type: str | None = None,
    *,
    choices: Sequence[str] | Mapping[str, str] | None = None,
    boxed_only: bool = False,
) -> float:
  """1.0 if the response's answer matches the gold answer, else 0.0.

  Args:
    response: the decoded response.
    answer: the gold answer ('12', '3/4', 'B', 'yes', '\\frac{1}{2}', 'red').
    answer_type: see the module docstring; None infers it from `answer`.
    choices: option texts (A first) or {letter: text}, so that a choice
      answered by its text ('red') matches the letter and vice versa.
    boxed_only: only an answer inside a final `\\boxed{}` counts (the strict
      reading RL rewards use: a policy cannot drift away from the format
      and keep its reward).
  """
  if boxed_only and not _boxed_spans(
      unicodedata.normalize("NFKC", response or "")
  ):
    return 0.0
  try:
    return 1.0 if _verify(response, answer, answer_type, choices) else 0.0
  except Exception:  # pylint: disable=broad-except
    return 0.0


# ------------------------------------------------------------------------------
# Format and shaping.
# ------------------------------------------------------------------------------


def format_reward(
    response: str, require_think: bool = False, focus_token: str | None = None
) -> float:
  """1.0 if the response is well formed, else 0.0.

  Well formed: exactly one `\\boxed{`, closed and non-empty; with
  `focus_token`, the response begins with it (leading whitespace allowed);
  with `require_think`, one `<think>...</think>` block opens the response
  (after the focus token) and the box comes after it.
  """
  if not isinstance(response, str):
    return 0.0
  text = response.lstrip()
  if focus_token:
    if not text.startswith(focus_token):
      return 0.0
    text = text[len(focus_token) :].lstrip()
  opens = list(_BOXED_RE.finditer(text))
  if len(opens) != 1 or text.count("\\boxed") != 1:
    return 0.0
  end = _balanced(text, opens[0].end())
  if end is None or not text[opens[0].end() : end - 1].strip():
    return 0.0
  if require_think:
    if text.count("<think>") != 1 or text.count("</think>") != 1:
      return 0.0
    close = text.find("</think>")
    if not text.startswith("<think>") or close > opens[0].start():
      return 0.0
  return 1.0


def reward_fn(
    response: str,
    answer: str,
    answer_type: str | None = None,
    *,
    correct_weight: float = 1.0,
    format_weight: float = 0.0,
    require_think: bool = False,
    focus_token: str | None = None,
    choices: Sequence[str] | Mapping[str, str] | None = None,
    boxed_only: bool = False,
) -> dict[str, float]:
  """Total reward and its parts for one response (`verify` for boxed_only).

  reward = correct_weight * correct + format_weight * format, with correct
  and format in {0, 1}. DAPO's overlong shaping depends on the response's
  length, not its text: the RL step adds `losses.overlong_penalty`.

  Returns:
    {'reward', 'correct', 'format'} as floats.
  """
  correct = verify(
      response, answer, answer_type, choices=choices, boxed_only=boxed_only
  )
  fmt = format_reward(response, require_think, focus_token)
  return {
      "reward": correct_weight * correct + format_weight * fmt,
      "correct": correct,
      "format": fmt,
  }


def batch_rewards(
    responses: Sequence[str],
    answers: Sequence[str],
    answer_types: Sequence[str | None] | None = None,
    *,
    choices: Sequence[Any] | None = None,
    **kwargs: Any,
) -> dict[str, np.ndarray]:
  """`reward_fn` over a batch: {'reward', 'correct', 'format'} float32[N]."""
  n = len(responses)
  types = answer_types if answer_types is not None else [None] * n
  outs = [
      reward_fn(
          responses[i],
          answers[i],
          types[i],
          choices=None if choices is None else choices[i],
          **kwargs,
      )
      for i in range(n)
  ]
  keys = ("reward", "correct", "format")
  return {k: np.array([o[k] for o in outs], np.float32) for k in keys}


# ------------------------------------------------------------------------------
# Reward terms by name (`rl.rewards`).
# ------------------------------------------------------------------------------

REWARDS = registry.Registry("reward", "rl.rewards", "rewards.REWARDS")


@dataclasses.dataclass(frozen=True)
class Responses:
  """What a reward term sees of one round's N sampled responses.

  Attributes:
    texts: the N decoded responses.
    answers: each response's gold answer (its prompt's), N strings.
    answer_types: each response's answer type (None: inferred).
    lengths: int32[N] response lengths in tokens.
    max_len: the sampler's max_new_tokens.
  """

  texts: Sequence[str]
  answers: Sequence[str]
  answer_types: Sequence[str | None]
  lengths: np.ndarray
  max_len: int


@REWARDS.register("correct")
def correct_reward(responses: Responses, spec) -> np.ndarray:
  """1 where `verify` accepts the answer (`spec.boxed_only`), float32[N]."""
  return np.asarray(
      [
          verify(t, a, k, boxed_only=spec.boxed_only)
          for t, a, k in zip(
              responses.texts, responses.answers, responses.answer_types
          )
      ],
      np.float32,
  )


@REWARDS.register("format")
def format_term(responses: Responses, spec) -> np.ndarray:
  """1 where the response is well formed (`format_reward`), float32[N]."""
  del spec
  return np.asarray([format_reward(t) for t in responses.texts], np.float32)


@REWARDS.register("overlong")
def overlong_term(responses: Responses, spec) -> np.ndarray:
  """DAPO's soft overlong punishment with `rl.overlong='shaping'` (else 0),
  float32[N] (`losses.overlong_penalty`)."""
  from faithful_rl import losses  # pylint: disable=g-import-not-at-top

  if spec.overlong != "shaping":
    return np.zeros((len(responses.texts),), np.float32)
  return np.asarray(
      losses.overlong_penalty(
          lengths=np.asarray(responses.lengths),
          max_len=responses.max_len,
          cache_len=spec.overlong_cache,
      ),
      np.float32,
  )


def score_terms(
    responses: Responses,
    spec,
    names: Sequence[str],
    weights: Mapping[str, float],
    options: Mapping[str, Mapping[str, Any]],
) -> dict[str, np.ndarray]:
  """Each named term and their weighted sum, "reward" (float32[N] each).

  "correct" is always scored (accuracy and EASE's gate read it); it joins
  the reward only when named. A term's weight defaults to 1.
  """
  out = {}
  for name in dict.fromkeys(("correct",) + tuple(names)):
    out[name] = REWARDS.get(name)(responses, spec, **options.get(name, {}))
  reward = np.zeros((len(responses.texts),), np.float32)
  for name in names:
    reward = reward + np.float32(weights.get(name, 1.0)) * out[name]
  out["reward"] = reward.astype(np.float32)
  return out


__all__ = [
    "REWARDS",
    "Responses",
    "batch_rewards",
    "extract_answer",
    "format_reward",
    "reward_fn",
    "score_terms",
    "verify",
]
