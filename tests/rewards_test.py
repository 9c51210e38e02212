"""Tests of faithful_rl.rewards on tricky strings."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from faithful_rl import rewards


@pytest.mark.parametrize(
    "response,answer_type,want",
    [
        ("so \\boxed{\\frac{1}{2}}.", None, "\\frac{1}{2}"),
        ("\\boxed{\\frac{a}{\\sqrt{b}}}", "math", "\\frac{a}{\\sqrt{b}}"),
        ("first \\boxed{3} then \\boxed{4}", None, "4"),  # the last one
        ("\\boxed{\\{1, 2\\}}", None, "\\{1, 2\\}"),  # escaped braces
        ("\\boxed{7} and an unclosed \\boxed{8", None, "7"),
        ("The answer is 12.", None, "12"),
        ("Final answer: 3.5", "number", "3.5"),
        ("<answer> 42 </answer>", None, "42"),
        ("We count 3 cats and 4 dogs, so 7", "number", "7"),
        ("I pick (B) because it is red.", "choice", "B"),
        ("Answer: B) red", "choice", "B"),
        ("It is option C", "choice", "C"),
        ("A man stands here.", "choice", None),  # 'A' is an article
        ("(B)", None, "B"),
        ("Yes.", None, "yes"),
        ("Hmm... no, there is none.", "yes_no", "no"),
        ("\\boxed{Yes}", "yes_no", "yes"),
        ("", None, None),
        ("   ", "number", None),
        ("no digits here", "number", None),
        ("ｘ＝１２", "number", "12"),  # full-width digits (NFKC)
    ],
)
def test_extract_answer(response, answer_type, want):
  assert rewards.extract_answer(response, answer_type) == want


def test_extract_answer_non_string():
  assert rewards.extract_answer(None) is None
  assert rewards.extract_answer(12) is None


@pytest.mark.parametrize(
    "response,answer,answer_type,want",
    [
        # Numbers.
        ("The answer is 12.", "12", "number", 1.0),
        ("The answer is 12.", "13", "number", 0.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", "number", 1.0),
        ("\\boxed{0.75}", "3/4", "number", 1.0),
        ("\\boxed{\\dfrac{3}{4}}", "3/4", None, 1.0),
        ("\\boxed{1,000}", "1000", "number", 1.0),
        ("\\boxed{1{,}000}", "1000", "number", 1.0),
        ("\\boxed{-3}", "-3.0", "number", 1.0),
        ("\\boxed{3}", "-3", "number", 0.0),
        ("\\boxed{−3}", "-3", "number", 1.0),  # unicode minus
        ("\\boxed{12 apples}", "12", "number", 1.0),
        ("\\boxed{0.3333333}", "1/3", "number", 1.0),
        ("\\boxed{0.33}", "1/3", "number", 0.0),
        ("\\boxed{1234568}", "1234567", "number", 0.0),
        ("\\boxed{\\$5}", "5", "number", 1.0),
        ("\\boxed{30^\\circ}", "30", "number", 1.0),
        # Percentages: '%' side may mean x or x / 100; bare numbers never.
        ("\\boxed{50\\%}", "0.5", "number", 1.0),
        ("\\boxed{50%}", "50", "number", 1.0),
        ("\\boxed{0.5}", "50%", "number", 1.0),
        ("\\boxed{0.5}", "50", "number", 0.0),
        # Symbolic, through math_verify.
        ("\\boxed{\\sqrt{2}}", "2^{1/2}", "math", 1.0),
        ("\\boxed{(x+1)^2}", "x^2+2x+1", "math", 1.0),
        ("\\boxed{x+2}", "x+1", "math", 0.0),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", None, 1.0),
        # Choices.
        ("I pick (B).", "B", "choice", 1.0),
        ("\\boxed{B}", "(B)", "choice", 1.0),
        ("\\boxed{C}", "B", "choice", 0.0),
        ("Answer: B. red", "B", "choice", 1.0),
        ("(B)", "B", None, 1.0),
        ("The answer is red.", "red", "choice", 1.0),
        ("\\boxed{\\text{(B) red}}", "B", "choice", 1.0),
        # Yes / no.
        ("Yes.", "yes", "yes_no", 1.0),
        ("YES", "Yes", None, 1.0),
        ("\\boxed{No}", "no", "yes_no", 1.0),
        ("No.", "yes", "yes_no", 0.0),
        # Text.
        ("\\boxed{The Red  Circle!}", "red circle", "text", 1.0),
        ("\\boxed{\\text{blue}}", "Blue", "text", 1.0),
        ("\\boxed{green}", "blue", "text", 0.0),
        ("\\boxed{café}", "Café", "text", 1.0),
        # Nothing to read, odd input: 0, never an exception.
        ("", "12", "number", 0.0),
        ("I do not know", "12", "number", 0.0),
        ("\\boxed{}", "12", None, 0.0),
        ("\\boxed{" * 50, "1", "math", 0.0),
        ("\\boxed{1/0}", "1", "number", 0.0),
        ("\\boxed{12}", "12", "no-such-type", 1.0),  # unknown type: inferred
        (None, "12", "number", 0.0),
        ("\\boxed{12}", None, "number", 0.0),
    ],
)
def test_verify(response, answer, answer_type, want):
  assert rewards.verify(response, answer, answer_type) == want


def test_verify_choice_by_option_text():
  choices = ["blue", "red", "green"]
  assert rewards.verify("\\boxed{red}", "B", "choice", choices=choices) == 1.0
  assert rewards.verify("\\boxed{blue}", "B", "choice", choices=choices) == 0.0
  assert rewards.verify("(B)", "red", "choice", choices=choices) == 1.0
  assert rewards.verify("(A)", "red", "choice", choices=choices) == 0.0
  prefixed = {"A": "A. blue", "B": "B. red"}
  assert rewards.verify("\\boxed{red}", "B", "choice", choices=prefixed) == 1.0


def test_verify_off_main_thread():
  # math_verify's SIGALRM timeout cannot run here; verify must still work.
  out = []
  t = threading.Thread(
      target=lambda: out.append(
          rewards.verify("\\boxed{\\sqrt{4}}", "2", "math")
      )
  )
  t.start()
  t.join()
  assert out == [1.0]


@pytest.mark.parametrize(
    "response,kwargs,want",
    [
        ("so \\boxed{3}", {}, 1.0),
        ("\\boxed{3} or \\boxed{4}", {}, 0.0),
        ("the answer is 3", {}, 0.0),
        ("\\boxed{}", {}, 0.0),
        ("\\boxed{3", {}, 0.0),
        ("\\boxed{\\frac{1}{2}}", {}, 1.0),
        ("<Focus> I look. \\boxed{3}", {"focus_token": "<Focus>"}, 1.0),
        ("I look <Focus> \\boxed{3}", {"focus_token": "<Focus>"}, 0.0),
        ("<think>x</think> \\boxed{3}", {"require_think": True}, 1.0),
        ("<think>x \\boxed{3}</think>", {"require_think": True}, 0.0),
        ("\\boxed{3}", {"require_think": True}, 0.0),
        (
            "<Focus><think>x</think>\\boxed{3}",
            {"require_think": True, "focus_token": "<Focus>"},
            1.0,
        ),
        ("", {}, 0.0),
    ],
)
def test_format_reward(response, kwargs, want):
  assert rewards.format_reward(response, **kwargs) == want


def test_reward_fn_composition():
  out = rewards.reward_fn(
      "\\boxed{12}",
      "12",
      "number",
      format_weight=0.5,
  )
  assert out == {"reward": 1.0 + 0.5, "correct": 1.0, "format": 1.0}
  out = rewards.reward_fn("12 \\boxed{11} \\boxed{12}", "12", "number")
  assert out["reward"] == 1.0 and out["format"] == 0.0  # weight 0 by default
  batch = rewards.batch_rewards(
      ["\\boxed{12}", "\\boxed{B}", "no answer"],
      ["12", "red", "yes"],
      ["number", "choice", None],
      choices=[None, ["blue", "red"], None],
  )
  np.testing.assert_allclose(batch["correct"], [1.0, 1.0, 0.0])
  np.testing.assert_allclose(batch["reward"], [1.0, 1.0, 0.0])
  assert batch["reward"].dtype == np.float32
