"""The RL stage: one step as one learner over one typed rollout batch.

  learner = rl.Learner(config, graphdef=..., tx=..., mesh=..., ...)
  state, metrics = learner.step(state, rng)

Modules: `batch` (`RolloutBatch`, its abstract shapes and chunk layouts),
`analysis` (the no-gradient passes, advantages),
`rounds` (sampling rounds, rewards, dynamic sampling, the batch),
`learner` (`Learner`).
"""

from faithful_rl.rl.batch import RolloutBatch
from faithful_rl.rl.batch import layout
from faithful_rl.rl.batch import pad_prompts
from faithful_rl.rl.batch import plan
from faithful_rl.rl.batch import unlayout
from faithful_rl.rl.rounds import Spec
from faithful_rl.rl.rounds import assemble
from faithful_rl.rl.rounds import collect
from faithful_rl.rl.rounds import sample_rows
from faithful_rl.rl.learner import Learner
from faithful_rl.rl.learner import black_patch
from faithful_rl.rl.learner import check_sizes

__all__ = [
    "Learner",
    "RolloutBatch",
    "Spec",
    "assemble",
    "black_patch",
    "check_sizes",
    "collect",
    "layout",
    "pad_prompts",
    "plan",
    "sample_rows",
    "unlayout",
]
