"""Huge pages for glibc's malloc when training on the CPU backend: `owl-train --huge_pages`.

XLA's CPU runtime allocates a compiled step's temporaries in one large block, which glibc maps fresh on
every call and unmaps afterwards, so each step faults every page of it in again. glibc's
`glibc.malloc.hugetlb=1` tunable makes malloc ask the kernel for transparent huge pages on such mappings
(2 MiB pages instead of 4 KiB: a few hundred faults a step instead of many thousands). glibc reads tunables
only when a process starts, so `reexec_with_huge_pages` runs the same command line again with the tunable
in its environment; call it before loading JAX. docs/performance.md has the measurements: a gain with
scanned layers, slower and erratic float32 steps with unrolled ones.

It applies only where it can: Linux with glibc 2.35 or later, transparent huge pages not `never`, and JAX on
its CPU backend (accelerators allocate their own memory, so on a GPU or TPU host it does nothing). As this
is decided before JAX loads, "CPU backend" means `JAX_PLATFORMS` names `cpu` first, or it is unset and no
JAX accelerator plugin (CUDA, ROCm, TPU) is installed. Importing this module does not import JAX.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import re
import sys
from collections.abc import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb"
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


def accelerator_plugins() -> list[str]:
    """Names of the installed JAX plugins for accelerators (e.g. `xla_cuda12`, `libtpu`), found without
    importing JAX. JAX prefers any of them to its CPU backend when no `JAX_PLATFORMS` is set."""
    names = {ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")}
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names.update(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations))
    if importlib.util.find_spec("libtpu") is not None:
        names.add("libtpu")
    return sorted(names)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def unavailable_reason(
    environ: Mapping[str, str],
    *,
    libc: tuple[str, str],
    thp: str | None,
    plugins: Sequence[str],
    system: str = sys.platform,
) -> str | None:
    """Why huge pages cannot be turned on for this process, in a few words; None where they can.

    `libc` is `libc_version()`, `thp` is `thp_mode()`, `plugins` is `accelerator_plugins()`."""
    if not system.startswith("linux"):
        return f"needs Linux (this is {system})"
    name, version = libc
    if name != "glibc" or _version(version) < (2, 35):  # the tunable first shipped in glibc 2.35
        return f"needs glibc 2.35 or later (this is {' '.join(libc).strip() or 'another C library'})"
    if thp not in ("always", "madvise"):
        return f"transparent huge pages are {thp or 'unavailable'} in this kernel"
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms and platforms.split(",")[0].strip().lower() != "cpu":
        return f"JAX_PLATFORMS={platforms} selects an accelerator; huge pages are for the CPU backend only"
    if not platforms and plugins:
        return (
            f"JAX may use an accelerator here ({', '.join(plugins)} installed); huge pages are for the CPU "
            f"backend only (JAX_PLATFORMS=cpu trains on the CPU)"
        )
    if TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return f"GLIBC_TUNABLES already sets {TUNABLE}"
    return None


def huge_page_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with `glibc.malloc.hugetlb=1` added to `GLIBC_TUNABLES` (other tunables kept) and the
    mark that stops the re-executed process from re-executing again."""
    env = dict(environ)
    tunables = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, f"{TUNABLE}=1") if t)
    env[_RERUN_MARK] = "1"
    return env


def reexec_with_huge_pages() -> str | None:
    """Replace this process with the same command run with `glibc.malloc.hugetlb=1` where that applies (see
    the module docstring). Otherwise return why not (a one-line note for the user), or None in the process
    that was re-executed. Call it before doing any work: nothing done before it survives. The process keeps
    its id, arguments, interpreter options and the rest of its environment."""
    if os.environ.get(_RERUN_MARK):
        return None
    reason = unavailable_reason(os.environ, libc=libc_version(), thp=thp_mode(), plugins=accelerator_plugins())
    if reason is not None:
        return reason
    if not sys.executable:
        return "cannot find the Python interpreter to run again"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], huge_page_env(os.environ))
