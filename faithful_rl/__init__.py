"""faithful_rl: RLVR on Qwen vision-language models, with visual attention
anchored to evidence (EASE, Faithful-MR1) beside GRPO, DAPO and VPPO."""

__version__ = "0.1.0"
