"""Shared pytest setup: float32 CPU numerics and the tiny HF model fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
# JAX's persistent compilation cache, shared by this session's processes
# (pytest-xdist workers, the trainer subprocesses, notebook kernels): the
# same tiny runs compile the same programs many times over.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        ".pytest_cache",
        "jax_compilation_cache",
    ),
)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_default_matmul_precision", "highest")
