"""Pure policy-gradient and attention-supervision losses (docs/methods.md).

Every loss is a keyword-only pure function returning `(loss, metrics)`,
with `loss` a float32 scalar and `metrics` a dict of float32 scalars that
carry no gradient. Log-softmax and all reductions run in float32.

Axis alphabet: B responses (trajectories), T response tokens, D width,
V vocabulary (token losses) or visual tokens (attention losses), H heads,
Q probed query rows, K sampled rows, N rewards, G group size.

Attention inputs are the model's probe outputs: float32[B, Q, V] (head
mean) or [B, H, Q, V] (per head), softmax probabilities over every key the
query sees, not renormalised over the visual columns; padding columns are
exactly 0.

The EASE target (Gaussian mixture over the merged visual-token grid,
docs/methods.md 3) is built on the host by `faithful_rl.data.targets.ease_target`; the
losses here take it as an input array.

Modules: `reductions`, `policy` (GRPO/DAPO), `attention` (EASE,
Faithful-MR1), `vppo`, and `registry` (losses chosen by name in the
config: `register`, `get`). Every public name is importable from here.
"""

from faithful_rl.data.targets import ease_target
from faithful_rl.losses.attention import anchor_loss
from faithful_rl.losses.attention import attention_diagnostics
from faithful_rl.losses.attention import attention_kl
from faithful_rl.losses.attention import attention_mass_reward
from faithful_rl.losses.attention import causal_effect
from faithful_rl.losses.attention import ease_counted
from faithful_rl.losses.attention import ease_loss
from faithful_rl.losses.attention import sample_query_rows
from faithful_rl.losses.attention import trajectory_attention
from faithful_rl.losses.policy import chunked_token_logprobs
from faithful_rl.losses.policy import dapo_loss
from faithful_rl.losses.policy import grpo_advantages
from faithful_rl.losses.policy import grpo_loss
from faithful_rl.losses.policy import overlong_filter_mask
from faithful_rl.losses.policy import overlong_penalty
from faithful_rl.losses.policy import policy_loss
from faithful_rl.losses.policy import select_groups
from faithful_rl.losses.policy import token_entropy
from faithful_rl.losses.policy import token_logprobs
from faithful_rl.losses.policy import zero_variance_groups
from faithful_rl.losses.reductions import masked_mean
from faithful_rl.losses.reductions import masked_sum
from faithful_rl.losses.registry import get
from faithful_rl.losses.registry import register
from faithful_rl.losses.vppo import topk_token_mask
from faithful_rl.losses.vppo import visual_dependency
from faithful_rl.losses.vppo import vppo_advantage_scale

__all__ = [
    "anchor_loss",
    "attention_diagnostics",
    "attention_kl",
    "attention_mass_reward",
    "causal_effect",
    "chunked_token_logprobs",
    "dapo_loss",
    "ease_counted",
    "ease_loss",
    "ease_target",
    "get",
    "grpo_advantages",
    "grpo_loss",
    "masked_mean",
    "masked_sum",
    "overlong_filter_mask",
    "overlong_penalty",
    "policy_loss",
    "register",
    "sample_query_rows",
    "select_groups",
    "token_entropy",
    "token_logprobs",
    "topk_token_mask",
    "trajectory_attention",
    "visual_dependency",
    "vppo_advantage_scale",
    "zero_variance_groups",
]
