from setuptools import setup

setup(
    name="shakespeare-gpt",
    version="0.1.0",
    description="A small, hackable GPT trained on Shakespeare, with a fused causal-attention Triton kernel",
    packages=["kernels", "gpt"],  # bench/ and tests/ run from a checkout (conftest.py puts its root on the path)
    python_requires=">=3.10",
    # torch is a range so that an already installed build (e.g. the CPU wheel torch==2.13.0) is kept;
    # 2.9 is the first release with torch.optim.Muon, which the default run uses.
    install_requires=["torch>=2.9", "triton", "tqdm", "matplotlib", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "ruff"]},
    entry_points={
        "console_scripts": [
            "gpt-train=gpt.train:main",
            "gpt-sample=gpt.sample:main",
            "gpt-reverse=gpt.reverse:main",
        ]
    },
)
