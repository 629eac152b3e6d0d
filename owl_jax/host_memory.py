"""Huge pages for the host's malloc, for training on a CPU.

XLA's CPU runtime allocates a compiled step's temporaries in one block (763 MB for the float32 stage-1
step of `benchmarks/cpu_compare.py --config small`), which glibc maps fresh on every call and unmaps
afterwards, so each step faults every page of it in again: about 186 thousand page faults and
0.3 s of system time per step there. glibc's `glibc.malloc.hugetlb=1` tunable makes malloc ask the kernel
for transparent huge pages on such mappings (2 MiB pages, a few hundred faults per step). glibc reads
tunables only when a process starts, so a running process turns it on by executing its own command line
again with the tunable in its environment: `reexec_with_huge_pages`, which `train.py` calls before it
loads JAX when the model's layers are scanned (the default). With unrolled layers the float32 steps measured
slower and erratic with huge pages, so those runs keep plain malloc (docs/performance.md).

It is skipped where it cannot apply (not Linux, not glibc 2.35 or later, transparent huge pages set to
`never`), where `GLIBC_TUNABLES` already names the tunable, and when `OWL_JAX_HUGE_PAGES=0`.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "OWL_JAX_HUGE_PAGES"  # "0" (or false/no/off) keeps the process as it is
_RERUN_MARK = "OWL_JAX_HUGE_PAGES_RERUN"  # set in the re-executed process, so it never re-executes again
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode (`always`, `madvise` or `never`), or None if unknown."""
    try:
        with open(path) as f:
            match = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return match.group(1) if match else None


def libc_version() -> tuple[str, str]:
    """`("glibc", "2.36")` for the glibc this process runs on (not the one it was built against);
    `("", "")` for any other C library."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (AttributeError, ValueError, OSError):
        return "", ""
    return (name, version) if name == "glibc" else ("", "")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def huge_page_env(environ: Mapping[str, str], *, libc: tuple[str, str], thp: str | None,
                  system: str = sys.platform) -> dict[str, str] | None:
    """The environment to run this process again with, or None where huge pages do not apply or were
    declined. `libc` is `(name, version)` of the C library this process runs on (`libc_version()`), `thp`
    is `thp_mode()`."""
    if not system.startswith("linux") or environ.get(_RERUN_MARK):
        return None
    if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    name, version = libc
    if name != "glibc" or _version(version) < (2, 35):  # the tunable first shipped in glibc 2.35
        return None
    if thp not in ("always", "madvise"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, f"{TUNABLE}=1") if t)
    env[_RERUN_MARK] = "1"
    return env


def reexec_with_huge_pages() -> None:
    """Replace this process with the same command run with `glibc.malloc.hugetlb=1`, where that applies
    (see the module docstring); otherwise return. Call it before doing any work: nothing done before it
    survives. The process keeps its id, arguments, interpreter options and the rest of its environment."""
    env = huge_page_env(os.environ, libc=libc_version(), thp=thp_mode())
    if env is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
