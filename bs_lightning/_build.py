"""Build and load the compiled kernels (`csrc/`) as one torch extension library.

The library is compiled on first use with `torch.utils.cpp_extension.load` (ninja) into a
cache directory whose name is a hash of everything that changes the binary: the sources,
the flags, the torch and Python versions and the CPU (the CPU code is built with
`-march=native` unless `BS_LIGHTNING_MARCH` names another target). A later process finds
the built library there and only loads it; editing a source gives a new hash, hence a
rebuild.

`csrc/ops.cpp` and `csrc/cpu/*.cpp` are always compiled; `csrc/cuda/*.cu` join the same
library when torch is a CUDA build, `nvcc` is found, `BS_LIGHTNING_NO_CUDA` is not `1`, and
either a GPU is visible or `BS_LIGHTNING_BUILD_CUDA=1` asks for them (CI compiles the CUDA
sources on a machine without a GPU that way; a CPU-only user does not wait for nvcc).

Environment:
    BS_LIGHTNING_CACHE: cache root (default `~/.cache/bs_lightning/kernels`).
    BS_LIGHTNING_NO_CUDA: `1` builds the CPU kernels only.
    BS_LIGHTNING_BUILD_CUDA: `1` compiles the CUDA kernels even when no GPU is visible.
    BS_LIGHTNING_NO_BUILD: `1` never compiles (loads a cached library if there is one).
    BS_LIGHTNING_MARCH: x86 `-march` target of the CPU code (default `native`), e.g.
        `x86-64-v3` for an AVX2 library on an AVX-512 machine (the tests cover both paths so).
    TORCH_CUDA_ARCH_LIST: CUDA architectures (default "8.0;9.0").
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

LIB_NAME = "bs_lightning_kernels"
DEFAULT_CUDA_ARCHS = "8.0;9.0"
BUILD_MESSAGE = "bs_lightning: building kernels (first use, cached)..."

_state: dict = {"tried": False, "loaded": False, "cuda": False, "path": None, "error": None}
_on_load: dict[str, Callable[[], None]] = {}


def csrc_dir() -> Path:
    """Kernel sources: `bs_lightning/csrc` in an installed wheel, else `<repo>/csrc`."""
    packaged = Path(__file__).resolve().parent / "csrc"
    if (packaged / "ops.cpp").is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "csrc"


def cuda_home() -> str | None:
    """The CUDA toolkit to compile `csrc/cuda/*.cu` with, or None when CUDA is not built.

    A toolkit is a folder with `bin/nvcc` and `include/cuda_runtime.h`: `CUDA_HOME`,
    `CUDA_PATH`, `/usr/local/cuda`, then torch's guess (which follows `nvcc` on PATH and can
    land on a wrapper script outside the toolkit, e.g. `/usr/local/bin/nvcc`).
    """
    if os.environ.get("BS_LIGHTNING_NO_CUDA") == "1" or torch.version.cuda is None:
        return None
    # Without a GPU the CUDA kernels could not run: compile them only when asked to.
    if os.environ.get("BS_LIGHTNING_BUILD_CUDA") != "1" and not torch.cuda.is_available():
        return None

    def is_toolkit(home: str | None) -> bool:
        return bool(home) and all(
            (Path(home) / sub).is_file() for sub in ("bin/nvcc", "include/cuda_runtime.h")
        )

    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if is_toolkit(home):
            return home
    # Imported only here: importing cpp_extension logs a notice on machines without a GPU.
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME if is_toolkit(cpp_extension.CUDA_HOME) else None


def _sources() -> tuple[list[Path], list[Path]]:
    """(C++ sources, CUDA sources to compile); CUDA ones only when `cuda_home()`."""
    root = csrc_dir()
    cpp = [root / "ops.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    cu = sorted((root / "cuda").glob("*.cu")) if cuda_home() else []
    return cpp, cu


def _headers() -> list[Path]:
    """Headers the build includes: csrc/ and csrc/cpu/, plus csrc/cuda/ when it is built."""
    root = csrc_dir()
    folders = [root, root / "cpu"] + ([root / "cuda"] if _sources()[1] else [])
    return sorted(p for d in folders for p in d.glob("*") if p.suffix in (".h", ".cuh", ".hpp"))


def _cuda_arch_flags() -> list[str]:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    flags = []
    for arch in archs.replace(" ", ";").split(";"):
        if not arch:
            continue
        num = arch.split("+")[0].replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _cuda_include_paths() -> list[str]:
    """cuBLAS/cuSPARSE headers of the pip CUDA wheels (needed by `ATen/cuda/CUDAContext.h`)."""
    try:
        import nvidia  # namespace package of the pip CUDA wheels
    except ImportError:
        return []
    paths = []
    for base in nvidia.__path__:
        for sub in ("cu13", "cu12"):
            inc = Path(base) / sub / "include"
            if inc.is_dir():
                paths.append(str(inc))
    return paths


def _build_args() -> dict:
    cpp, cu = _sources()
    # -ffp-contract=fast: strict -std=c++20 would otherwise forbid fusing a * b + c into FMA.
    cflags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=fast"]
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        # JIT build on the machine that runs it: use its vector units (AVX2/AVX-512/NEON).
        if platform.machine() in ("x86_64", "AMD64"):
            cflags.append(f"-march={os.environ.get('BS_LIGHTNING_MARCH') or 'native'}")
        else:
            cflags.append("-mcpu=native")
    args = {
        "sources": [str(p) for p in cpp + cu],
        "extra_cflags": cflags,
        "extra_ldflags": ["-fopenmp"],
        "extra_include_paths": [str(csrc_dir())],
        "with_cuda": bool(cu),
    }
    if cu:
        args["cuda_home"] = cuda_home()
        args["extra_cflags"] = cflags + ["-DBS_LIGHTNING_WITH_CUDA"]
        # No --use_fast_math: it makes tanhf the ~2^-11-accurate MUFU.TANH in the fp32 LSTM
        # gates. The pip wheels' cuBLAS/cuSPARSE headers go in with -isystem, after the
        # toolkit's own -I headers, so they only fill in what the toolkit lacks.
        system = [flag for inc in _cuda_include_paths() for flag in ("-isystem", inc)]
        args["extra_cflags"] += system
        args["extra_cuda_cflags"] = [
            "-O3",
            "-std=c++20",
            "-DBS_LIGHTNING_WITH_CUDA",
            *system,
            *_cuda_arch_flags(),
        ]
    return args


def _cpu_signature() -> str:
    """CPU model and flags: a library built with -march=native only runs on such a CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def build_tag(args: dict) -> str:
    """Hash of sources, headers, flags, torch/Python versions and CPU: the cache key."""
    h = hashlib.sha256()
    for path in [*args["sources"], *map(str, _headers())]:
        h.update(path.encode())
        h.update(Path(path).read_bytes())
    for key in (
        "extra_cflags",
        "extra_cuda_cflags",
        "extra_ldflags",
        "extra_include_paths",
        "cuda_home",
    ):
        h.update(repr(args.get(key)).encode())
    h.update(f"{torch.__version__}|{torch.version.cuda}|{sys.version}".encode())
    h.update(_cpu_signature().encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    root = os.environ.get("BS_LIGHTNING_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "bs_lightning" / "kernels"


def _op_registered() -> bool:
    return hasattr(torch.ops, "bs_lightning") and all(
        hasattr(torch.ops.bs_lightning, op) for op in ("balanced_linear", "balanced_linear_tiled")
    )


def _build_and_load() -> tuple[str, bool]:
    """Compile (if not cached) and load; returns (library path, has CUDA kernels)."""
    args = _build_args()
    home = args.pop("cuda_home", None)
    build_dir = cache_root() / build_tag({**args, "cuda_home": home})
    lib = build_dir / f"{LIB_NAME}.so"
    if lib.is_file():
        try:
            torch.ops.load_library(str(lib))
            return str(lib), args["with_cuda"]
        except OSError:
            pass  # another process is still linking it: wait for its build lock below
    if os.environ.get("BS_LIGHTNING_NO_BUILD") == "1":
        raise RuntimeError(f"no cached library at {lib} and BS_LIGHTNING_NO_BUILD=1")
    # Imported only to build: importing it logs a notice on machines without a GPU.
    from torch.utils import cpp_extension

    if home:
        # torch takes include and library paths from this global, set once at its import.
        cpp_extension.CUDA_HOME = home
    print(BUILD_MESSAGE, file=sys.stderr, flush=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=LIB_NAME,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
        **args,
    )
    return str(lib), args["with_cuda"]


def load() -> bool:
    """Build (first use) and load the kernels once per process; True when the op exists.

    A failure is reported by one `RuntimeWarning`; callers then use the reference.
    """
    if _state["tried"]:
        return _state["loaded"]
    _state["tried"] = True
    try:
        if not _op_registered():
            _state["path"], _state["cuda"] = _build_and_load()
        if not _op_registered():
            raise RuntimeError(
                "library loaded but torch.ops.bs_lightning.balanced_linear is missing"
            )
    except Exception as exc:  # any build/load failure degrades to the reference path
        _state["error"] = f"{type(exc).__name__}: {exc}"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(
            f"bs_lightning: compiled kernels unavailable ({first_line}); using the pure-PyTorch "
            "reference (slow). `python -m bs_lightning.ops --build` shows the full error.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _state["loaded"] = True
    for callback in _on_load.values():
        callback()
    return True


def on_load(key: str, callback: Callable[[], None]) -> None:
    """Run `callback` once the library is loaded (now, if it already is). One per `key`."""
    if key in _on_load:
        return
    _on_load[key] = callback
    if _state["loaded"]:
        callback()


def is_loaded() -> bool:
    return _state["loaded"]


def has_cuda_kernels() -> bool:
    return _state["loaded"] and _state["cuda"]


def last_error() -> str | None:
    return _state["error"]


def describe() -> list[str]:
    """Human-readable build status lines for `python -m bs_lightning.ops --info`."""
    cpp, cu = _sources()
    lines = [
        f"torch {torch.__version__} (cuda {torch.version.cuda}), threads {torch.get_num_threads()}",
        f"sources: {csrc_dir()} ({len(cpp)} C++, {len(cu)} CUDA)",
        f"cuda toolkit: {cuda_home() or 'not used'}",
        f"library: {_state['path'] or 'not loaded'}",
    ]
    if _state["error"]:
        lines.append(f"error: {_state['error']}")
    return lines
