"""Transparent huge pages for the big host buffers of XLA:CPU (Linux with glibc >= 2.35).

XLA:CPU allocates the temporary buffer of every execution afresh and frees it when the execution ends
(443 MB for the CPU benchmark's C-UNet train step, about 1 GB for its C-Swin-UNETR step). glibc serves
allocations that large with a new ``mmap`` and returns them with ``munmap``, so each step faults the
whole buffer in again, one 4 KB page at a time: about 115,000 page faults per C-UNet step (measured with
``getrusage``). glibc's ``glibc.malloc.hugetlb=1`` tunable asks for transparent huge pages (2 MB) on
those mappings instead, which cuts the faults by about 100x. On the 2-core benchmark VM the C-UNet
and C-Swin-UNETR train steps got 9.5 % and 7 % faster (medians of processes run in turn,
``benchmarks/RESULTS.md``). The memory still goes back to the system when
it is freed, so the resident size does not grow.

glibc reads its tunables only when a process starts, so the command-line entry points call
:func:`ensure_huge_pages` first: it executes the same command again with the tunable added to
``GLIBC_TUNABLES``. The PID, the arguments, the environment and the open files stay the same. Nothing
happens when the tunable is already set, when ``CINJAX_HUGE_PAGES=0``, or where it cannot apply
(another OS or C library, glibc older than 2.35, transparent huge pages set to ``never``). The
stand-alone tools (``python -m cinjax.predict``, ``.evaluate``, ``.export``) do not restart: their module
imports take 1.3-3.2 s before a restart could happen, more than a short job gains; set
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` for long ones.

Keeping the freed memory in the process instead (``mallopt`` with a single arena and no ``mmap``) was
faster still, but the heap grew by one step buffer every few dozen steps: 1.4 GB to 2.8 GB in 40 steps.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

ENV = "CINJAX_HUGE_PAGES"
TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
    """The running C library's version if it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return None
    return major, minor


def huge_pages_available(thp_setting: str = THP_SETTING) -> bool:
    """Whether a process here can get transparent huge pages by asking for them (``madvise``)."""
    if not sys.platform.startswith("linux"):
        return False
    version = glibc_version()
    if version is None or version < (2, 35):
        return False
    try:
        with open(thp_setting) as f:
            mode = f.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def huge_pages_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``GLIBC_TUNABLES`` already asks glibc for huge pages (this process was started with it)."""
    environ = os.environ if environ is None else environ
    settings = dict(t.partition("=")[::2] for t in environ.get("GLIBC_TUNABLES", "").split(":") if t)
    return settings.get(TUNABLE, "0") != "0"


def restart_environment(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The environment to restart with (``GLIBC_TUNABLES`` plus the huge-page tunable), or None when
    there is nothing to do: switched off by ``CINJAX_HUGE_PAGES=0``, already decided by whoever set the
    tunable, or not available here."""
    environ = os.environ if environ is None else environ
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get(ENV, "1") == "0" or TUNABLE in tunables or not huge_pages_available():
        return None
    return dict(environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1")


def ensure_huge_pages() -> None:
    """Run this command again with glibc's huge-page tunable set, if it is not set and applies here.

    Call it first in a command-line entry point, before anything is printed or started; it returns only
    when there is nothing to do (or the system refuses the restart).
    """
    env = restart_environment()
    argv = getattr(sys, "orig_argv", None)
    if env is None or not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:
        return
