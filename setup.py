from setuptools import setup

# pipelines/ and kernels/ install as fastft.pipelines and fastft.kernels so that nothing generic
# (a PyPI package called `kernels` exists) lands at the top level of site-packages.
setup(
    name="fastft",
    version="0.1.0",
    description="High-throughput MoCo v1/v2 + Feature Transformation trainer with pos/neg score visualization",
    packages=["fastft", "fastft.pipelines", "fastft.kernels"],
    package_dir={"fastft": "fastft", "fastft.pipelines": "pipelines", "fastft.kernels": "kernels"},
    python_requires=">=3.10",
    # Loose bounds on purpose: the GPU check machine brings its own (older) torch. The Makefile pins the dev stack.
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy",
        "pyyaml",
        "tqdm",
        "scikit-learn",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={"dev": ["pytest"]},
    entry_points={
        "console_scripts": [
            "fastft-train=fastft.train:main",
        ]
    },
)
