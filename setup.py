from setuptools import setup

# kernels.hf, our attention inside transformers models: 5.4 is the first release whose mask functions
# receive the query and key offsets it reads.
HF = ["transformers>=5.4,<6"]

setup(
    name="shakespeare-gpt",
    version="0.1.0",
    description="A small, hackable GPT trained on Shakespeare, with a fused causal-attention Triton kernel",
    packages=["kernels", "gpt"],  # bench/ and tests/ run from a checkout (conftest.py puts its root on the path)
    python_requires=">=3.10",
    # torch is a range so that an already installed build (e.g. the CPU wheel torch==2.13.0) is kept;
    # 2.9 is the first release with torch.optim.Muon, which the default run uses.
    install_requires=["torch>=2.9", "triton", "tqdm", "matplotlib", "numpy"],
    extras_require={"hf": HF, "test": ["pytest", "pytest-benchmark", "ruff", *HF]},
    entry_points={
        "console_scripts": [
            "gpt-train=gpt.train:main",
            "gpt-sample=gpt.sample:main",
            "gpt-reverse=gpt.reverse:main",
        ]
    },
)
