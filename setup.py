"""Build script: the pure-Python package, `gefx.kernels` (from kernels/) and the optional C++
extension `gefx._C` (csrc/).

The extension is built with torch's cpp_extension machinery (ninja, pybind11) against the torch
already installed, hence `pip install --no-build-isolation -e .` (torch is deliberately absent from
build-system.requires). It is optional:

    GEFX_BUILD_EXT=0    skip it (pure Python install; the torch reference backs every op)
    GEFX_BUILD_CUDA=1   also compile csrc/cuda/*.cu (needs a CUDA toolkit and a CUDA build of torch;
                        off by default until tested on a GPU)
    MAX_JOBS=N          parallel compile jobs (read by torch's ninja build)

A missing compiler or a failed compile never fails the install: the reason is written to
gefx/_C_build.txt, and `gefx env` shows it.
"""
import glob
import os
import sys
import traceback

from setuptools import setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
REPORT_NAME = "_C_build.txt"


def _report(text: str, build_lib: str | None = None) -> None:
    """Record the outcome of the extension build next to the package (read by gefx._cext)."""
    dirs = [os.path.join(HERE, "gefx")]
    if build_lib:
        dirs.append(os.path.join(build_lib, "gefx"))
    for d in dirs:
        try:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, REPORT_NAME), "w", encoding="utf-8") as fh:
                fh.write(text.rstrip() + "\n")
        except OSError:
            pass


def _tolerant(base):
    """A build_ext class that records a failed extension build instead of failing the install."""

    class TolerantBuildExt(base):
        _gefx_failed = False

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - compiler missing, ninja failure, ...
                if not self._gefx_failed:  # keep the first (real) reason, e.g. not a later copy error
                    self._failed(exc)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)
                return
            _report(f"built: {ext.name} (torch {_torch_version()}, "
                    f"{'with' if _cuda_requested() else 'without'} CUDA sources)", self.build_lib)

        def _failed(self, exc):
            self._gefx_failed = True
            detail = str(exc).strip().splitlines()
            detail = detail[-1] if detail else ""
            msg = (f"build failed: {type(exc).__name__}: {detail} "
                   "(rebuild with `pip install -v --no-build-isolation -e .` to see the compiler output)")
            sys.stderr.write(f"\nWARNING: gefx._C was not built; gefx falls back to the torch reference.\n"
                             f"{msg}\n{traceback.format_exc(limit=3)}\n")
            _report(msg, self.build_lib)

    return TolerantBuildExt


def _torch_version() -> str:
    try:
        import torch
        return torch.__version__
    except Exception:  # noqa: BLE001
        return "?"


def _cuda_requested() -> bool:
    return os.environ.get("GEFX_BUILD_CUDA", "0") == "1"


def _extension_kwargs() -> dict:
    """ext_modules and cmdclass for gefx._C, or nothing (with the reason recorded)."""
    if os.environ.get("GEFX_BUILD_EXT", "1").strip() == "0":
        _report("not built: skipped (GEFX_BUILD_EXT=0)")
        return {}
    try:
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001
        _report(f"not built: torch is not importable at build time ({type(exc).__name__}: {exc}); "
                "install torch first, then `pip install --no-build-isolation -e .`")
        return {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-std=c++17"]
    ldflags = ["-fopenmp"]
    if sys.platform == "darwin":  # Apple clang has no -fopenmp; ATen then runs the ops serially
        cxx, ldflags = ["-O3", "-std=c++17"], []
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)
    ext_cls = cpp_extension.CppExtension
    if _cuda_requested():
        import torch
        if torch.version.cuda and cpp_extension.CUDA_HOME:
            sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) +
                              glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
            kwargs["extra_compile_args"] = {"cxx": cxx + ["-DGEFX_WITH_CUDA"], "nvcc": ["-O3", "-DGEFX_WITH_CUDA"]}
            ext_cls = cpp_extension.CUDAExtension
        else:
            sys.stderr.write("GEFX_BUILD_CUDA=1 ignored: needs a CUDA build of torch and a CUDA toolkit "
                             f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})\n")
    ext = ext_cls("gefx._C", sources, **kwargs)
    build_ext = _tolerant(cpp_extension.BuildExtension.with_options(use_ninja=True))
    return {"ext_modules": [ext], "cmdclass": {"build_ext": build_ext}}


setup(
    packages=["gefx", "gefx.integrations", "gefx.rules", "gefx.unlearning", "gefx.kernels"],
    package_dir={"gefx": "gefx", "gefx.kernels": "kernels"},
    **_extension_kwargs(),
)
