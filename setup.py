"""mr1: Memory-R1 in JAX/Flax — LLM agents that learn to manage and use an external memory."""

from setuptools import find_packages, setup

setup(
    name="mr1",
    version="0.1.0",
    description="Memory-R1 reproduction in JAX/Flax: RL-trained Memory Manager and Answer Agent.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mr1", "mr1.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.6",            # optax.tree.norm
        "orbax-checkpoint",        # (brings tensorstore, which it uses for array storage)
        "transformers>=4.45",
        "datasets",
        "ml-collections",
        "gguf>=0.10",
        "safetensors",
        "absl-py",
        "tqdm",
        "numpy",
        "nltk",
        "matplotlib",
        "tensorboardX",            # TensorBoard event files (mr1.metrics_io)
    ],
    extras_require={
        # Test-only tools. The PyTorch reference (torch==2.13.0 CPU, accelerate) used by the
        # parity tests is installed by .ci/run directly, never through an extra users install.
        "test": ["pytest", "hypothesis", "sentencepiece",
                 "chex",           # pytree assertions in the RL / bank / env tests
                 # the Colab notebook runs top to bottom in CI (tests/test_notebook.py)
                 "nbclient", "nbformat", "ipykernel"],
        # Accelerator builds of jax for the launchers (launch/): TPU VMs and CUDA 12 GPUs.
        "tpu": ["jax[tpu]"],
        "cuda": ["jax[cuda12]"],
    },
)
