"""The CLIs' restart with glibc's huge-page tunable (cinjax.hostmem): when it happens, what it keeps, and
that it does what it is for (far fewer page faults on a big buffer allocated again and again)."""

import os
import subprocess
import sys

import pytest

from cinjax import hostmem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints its PID before the call and the tunables after it: a restart shows as a second "start" line.
RESTART_PROBE = (
    "import os; print('start', os.getpid(), flush=True); "
    "from cinjax import hostmem; hostmem.ensure_huge_pages(); "
    "print('after', os.getpid(), repr(os.environ.get('GLIBC_TUNABLES')), flush=True)"
)

# Allocates a fresh 256 MB buffer with the C library five times, touching all of it (as XLA:CPU does with
# a step's temporaries), and prints the page faults. (numpy asks for huge pages itself, so not numpy.)
FAULT_PROBE = (
    "import ctypes, resource\n"
    "libc = ctypes.CDLL(None)\n"
    "libc.malloc.restype = ctypes.c_void_p\n"
    "libc.free.argtypes = [ctypes.c_void_p]\n"
    "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "for _ in range(5):\n"
    "    buf = libc.malloc(256 << 20)\n"
    "    ctypes.memset(buf, 1, 256 << 20)\n"
    "    libc.free(buf)\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)\n"
)


def _env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.ENV)}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(overrides)
    return env


def _run(code: str, env: dict) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split("\n")[:-1]


def test_restart_keeps_the_pid_and_adds_the_tunable_once():
    lines = _run(RESTART_PROBE, _env())
    pid = lines[0].split()[1]
    if hostmem.huge_pages_available():
        assert lines == [f"start {pid}", f"start {pid}", f"after {pid} 'glibc.malloc.hugetlb=1'"]
    else:
        assert lines == [f"start {pid}", f"after {pid} None"]


@pytest.mark.parametrize(
    "overrides, tunables",
    [
        ({hostmem.ENV: "0"}, None),  # switched off
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "'glibc.malloc.hugetlb=0'"),  # the user's choice
    ],
)
def test_no_restart_when_switched_off_or_already_decided(overrides, tunables):
    lines = _run(RESTART_PROBE, _env(**overrides))
    pid = lines[0].split()[1]
    assert lines == [f"start {pid}", f"after {pid} {tunables}"]


def test_restart_environment_keeps_other_tunables(monkeypatch):
    monkeypatch.setattr(hostmem, "huge_pages_available", lambda: True)
    env = hostmem.restart_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4", "HOME": "/h"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1", "HOME": "/h"}
    assert hostmem.huge_pages_requested(env)
    assert not hostmem.huge_pages_requested({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
    monkeypatch.setattr(hostmem, "huge_pages_available", lambda: False)
    assert hostmem.restart_environment({}) is None


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("always [madvise] never\n", True),
        ("[always] madvise never\n", True),
        ("always madvise [never]\n", False),
    ],
)
def test_availability_follows_the_kernel_setting(tmp_path, setting, expected):
    path = tmp_path / "enabled"
    path.write_text(setting)
    glibc = hostmem.glibc_version()
    applies = sys.platform.startswith("linux") and glibc is not None and glibc >= (2, 35)
    assert hostmem.huge_pages_available(str(path)) == (expected and applies)
    assert not hostmem.huge_pages_available(str(tmp_path / "missing"))


def test_the_tunable_cuts_the_page_faults_of_a_reallocated_big_buffer():
    if not hostmem.huge_pages_available():
        # Nowhere to ask for huge pages: the CLIs then run as they are (tested above).
        assert hostmem.restart_environment(_env()) is None
        return
    (plain,) = _run(FAULT_PROBE, _env())
    (huge,) = _run(FAULT_PROBE, _env(GLIBC_TUNABLES="glibc.malloc.hugetlb=1"))
    # 5 x 256 MB in 4 KB pages is ~330,000 faults; in 2 MB pages ~640.
    assert int(plain) > 5 * (256 << 20) // 4096 * 0.9
    assert int(huge) < int(plain) / 20
