from setuptools import find_packages, setup

setup(
    name="trl-adaptive",
    version="0.1.0",
    description="Diffusion-DPO and minority-aware Adaptive-DPO for text-to-image diffusion models, TRL-style.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["trl_adaptive", "trl_adaptive.*"]),
    package_data={"trl_adaptive.evaluation": ["prompts/*"]},  # the built-in prompt sets and their licences
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.32",
        "transformers>=5.23",  # activation_checkpointing in TrainingArguments
        "accelerate>=1.0",
        "datasets>=3.0",
        "peft>=0.14",
        "trl>=0.12",
        "safetensors>=0.4",
        "numpy>=1.24",
        "Pillow>=10.0",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.15"],
        "test": ["pytest>=8.0", "pytest-timeout>=2.2", "tensorboard>=2.14"],
    },
    entry_points={"console_scripts": ["trl-adaptive=trl_adaptive.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
