"""Build of otseg: the Python package, the Triton kernels (as ``otseg.kernels``)
and the C++/CUDA extension ``otseg._C``.

Sources are found by convention: ``csrc/*.cpp`` and ``csrc/cpu/*.cpp`` always,
``csrc/cuda/*.cu`` and ``csrc/cuda/*.cpp`` (the CUDA backend's kernels and its
host code) when a CUDA toolkit and a CUDA build of torch are present (no GPU is
needed to compile).

Environment:
    OTSEG_NO_EXTENSIONS=1   build no extension (pure-Python install; only the
                            reference and triton backends are then available)
    OTSEG_NO_CUDA=1         build the CPU extension only
    OTSEG_WERROR=1          compiler warnings are errors (CI)
    CUDA_HOME / CUDA_PATH   the toolkit, when it is not found by itself
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default: 8.0;9.0+PTX, which covers
                            A100, 3090, H100 and newer, when no GPU is visible;
                            else the visible GPUs')
    MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = re.search(
    r'__version__ = "([^"]+)"', open(os.path.join(ROOT, "otseg", "_version.py")).read()
).group(1)


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _log(msg):
    print(f"otseg setup: {msg}", file=sys.stderr)


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home():
    """The CUDA toolkit that holds nvcc and the runtime headers, or None.

    `nvcc` on the PATH may be a wrapper script outside the toolkit (then
    torch's guess, the parent of its folder, is wrong); nvcc's dry run names
    the real folder.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            out = subprocess.run(
                [nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True, text=True, timeout=60,
            )
            m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
            if m:
                candidates.append(os.path.normpath(os.path.join(m.group(1), "..")))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_toolkit(c):
            return os.path.normpath(c)
    return None


def nvidia_pip_include_dirs():
    """Headers of the `nvidia-*` pip packages installed with a CUDA torch
    (e.g. cusparse.h, which torch's CUDA headers include)."""
    dirs = []
    for sp in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += glob.glob(os.path.join(sp, "nvidia", "*", "include"))
        dirs += glob.glob(os.path.join(sp, "nvidia", "*", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def extensions():
    if _flag("OTSEG_NO_EXTENSIONS"):
        _log("OTSEG_NO_EXTENSIONS set: building no extension")
        return [], {}
    try:
        import torch
    except ImportError:
        _log("torch is not importable in the build environment: building no extension")
        return [], {}

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    cuda_home = None
    if not _flag("OTSEG_NO_CUDA") and cuda_sources and torch.version.cuda:
        cuda_home = find_cuda_home()
        if cuda_home is None:
            _log("no CUDA toolkit found (set CUDA_HOME): building the CPU extension only")
        else:
            # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
            os.environ["CUDA_HOME"] = cuda_home
            if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "triton", "*.cpp")))
    torch_version = torch.__version__.split("+")[0]
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", f'-DOTSEG_TORCH_VERSION="{torch_version}"', "-Wall"]
    werror = _flag("OTSEG_WERROR")
    if werror:
        cxx.append("-Werror")
    kwargs = dict(
        name="otseg._C",
        extra_link_args=["-fopenmp"],
        include_dirs=[os.path.join(ROOT, "csrc")],
    )
    if cuda_home is not None:
        _log(f"CUDA toolkit {cuda_home}, architectures {os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPUs)')}")
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-DOTSEG_WITH_CUDA", "--expt-relaxed-constexpr"]
        if werror:
            nvcc += ["-Werror", "all-warnings"]
        kwargs["include_dirs"] += nvidia_pip_include_dirs()
        # csrc/triton/launch.cpp finds the CUDA driver with dlopen.
        kwargs["libraries"] = ["dl"]
        ext = CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DOTSEG_WITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None or _has_ninja_module())}


def _has_ninja_module():
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return False


ext_modules, cmdclass = extensions()

setup(
    name="otseg",
    version=VERSION,
    description="Fused Multi-Prompts Sinkhorn (OTSeg) kernels for CPU, CUDA and Triton, and the OTSeg model",
    packages=find_packages(include=["otseg", "otseg.*"]) + ["otseg.kernels"],
    package_dir={"otseg.kernels": "kernels"},
    package_data={"otseg.ops.mps": ["README.md"], "otseg.data": ["*.json", "text_embeddings/*.npy"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "POT>=0.9.5", "scipy"],
        "bench": ["POT>=0.9.5", "matplotlib"],
        "model": ["open_clip_torch"],
    },
    entry_points={"console_scripts": ["otseg=otseg.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
