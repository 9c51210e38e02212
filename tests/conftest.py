"""Shared pytest setup: float32 CPU numerics and the tiny HF model fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_default_matmul_precision", "highest")
