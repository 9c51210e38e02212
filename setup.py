"""faithful_rl: RLVR for Qwen vision-language models, with attention anchored to evidence."""

import setuptools

setuptools.setup(
    name="faithful_rl",
    version="0.1.0",
    description=(
        "JAX/Flax RLVR (GRPO, DAPO, VPPO, EASE, Faithful-MR1) for Qwen-VL"
    ),
    packages=setuptools.find_packages(
        include=["faithful_rl", "faithful_rl.*", "configs"]
    ),
    package_data={"faithful_rl": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "transformers>=5.23,<6",
        "tokenizers>=0.23",
        "safetensors>=0.8",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8",
        "grain>=0.2.18",
        "pillow>=10",
        "ml-collections>=1.1",
        "einops>=0.8",
        "numpy>=2",
        "tqdm",
        "absl-py",
        "tensorboardX",
        "math-verify>=0.9",
        "matplotlib",
        "psutil",
        "jinja2>=3.1",  # the tokenizer chat templates
    ],
    extras_require={
        "wandb": ["wandb"],  # metrics to Weights & Biases (optional)
        # JAX for an accelerator, at the version pinned above.
        "cuda12": ["jax[cuda12]>=0.10.2,<0.11"],
        "cuda13": ["jax[cuda13]>=0.10.2,<0.11"],
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch==2.13.0",
            "pyink==26.5.1",
            "nbclient",
            "nbformat",
            "ipykernel",
        ],
    },
)
