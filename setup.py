from setuptools import setup

# pipelines/ and kernels/ install as fastft.pipelines and fastft.kernels so that nothing generic
# (a PyPI package called `kernels` exists) lands at the top level of site-packages.
setup(
    name="fastft",
    version="0.1.0",
    description="High-throughput MoCo v1/v2 + Feature Transformation trainer with pos/neg score visualization",
    packages=["fastft", "fastft.bench", "fastft.pipelines", "fastft.kernels"],
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
    extras_require={
        # scikit-image: bundled photographs for the loader tests; import-linter: the import rules (.importlinter)
        "dev": ["pytest", "scikit-image", "import-linter"],
        # Fast loaders (pipelines/dali_loader.py, pipelines/ffcv_loader.py). ffcv builds from source against
        # Debian's pkg-config libturbojpeg0-dev libopencv-dev (the Makefile installs them); numba runs the colour
        # kernels of both on the CPU.
        "dali": ["nvidia-dali-cuda130", "numba"],
        "ffcv": ["ffcv==1.0.2", "numba"],
    },
    entry_points={
        "console_scripts": [
            "fastft-train=fastft.train:main",
            "fastft-viz=fastft.viz:main",
            "fastft-convert-dataset=fastft.pipelines.convert_cli:main",
            "fastft-check-dataset=fastft.pipelines.check_cli:main",
            "fastft-linear=fastft.linear:main",
            "fastft-knn=fastft.knn_cli:main",
            "fastft-export=fastft.export:main",
            "fastft-bench=fastft.bench.cli:main",
        ]
    },
)
