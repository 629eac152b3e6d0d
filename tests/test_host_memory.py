"""Huge pages for the host's malloc (`owl-train --huge_pages`): where they apply, and that the re-executed
process keeps its arguments, interpreter options and environment."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from owl_jax.cli import host_memory
from owl_jax.cli.host_memory import TUNABLE, huge_page_env, thp_mode, unavailable_reason

GLIBC = ("glibc", "2.36")
CPU = {"JAX_PLATFORMS": "cpu"}


def test_env_adds_the_tunable_and_keeps_everything_else():
    env = huge_page_env({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}=1"
    assert env["PATH"] == "/bin"
    assert huge_page_env({})["GLIBC_TUNABLES"] == f"{TUNABLE}=1"


@pytest.mark.parametrize(
    "environ, libc, thp, plugins",
    [
        (CPU, GLIBC, "madvise", []),
        (CPU, ("glibc", "2.35"), "always", []),
        ({}, GLIBC, "madvise", []),  # no accelerator plugin: JAX runs on the CPU
        ({"JAX_PLATFORMS": "cpu"}, GLIBC, "madvise", ["xla_cuda12"]),  # the CPU chosen over an installed GPU
    ],
)
def test_applies_on_linux_glibc_with_thp_on_the_cpu_backend(environ, libc, thp, plugins):
    assert unavailable_reason(environ, libc=libc, thp=thp, plugins=plugins, system="linux") is None


@pytest.mark.parametrize(
    "environ, libc, thp, plugins, system, why",
    [
        (CPU, GLIBC, "madvise", [], "darwin", "needs Linux"),
        (CPU, ("glibc", "2.34"), "madvise", [], "linux", "glibc 2.35 or later"),
        (CPU, ("", ""), "madvise", [], "linux", "another C library"),
        (CPU, GLIBC, "never", [], "linux", "are never"),
        (CPU, GLIBC, None, [], "linux", "unavailable"),
        ({"JAX_PLATFORMS": "cuda"}, GLIBC, "madvise", [], "linux", "JAX_PLATFORMS=cuda selects an accelerator"),
        ({"JAX_PLATFORMS": "tpu,cpu"}, GLIBC, "madvise", [], "linux", "CPU backend only"),
        ({}, GLIBC, "madvise", ["libtpu"], "linux", "libtpu installed"),
        ({**CPU, "GLIBC_TUNABLES": f"{TUNABLE}=0"}, GLIBC, "madvise", [], "linux", "already sets"),
    ],
)
def test_reason_where_huge_pages_do_not_apply(environ, libc, thp, plugins, system, why):
    assert why in unavailable_reason(environ, libc=libc, thp=thp, plugins=plugins, system=system)


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert thp_mode(str(f)) == "always"
    assert thp_mode(str(tmp_path / "missing")) is None


def test_reexec_runs_the_same_command_again_with_the_tunable(tmp_path):
    """A script that prints a line, calls `reexec_with_huge_pages`, then reports what it runs with. Where the
    tunable applies on this machine the first line appears twice (the command ran again from the top) and
    the report shows the tunable; where it does not apply, or with JAX on an accelerator, the script runs once
    and gets the reason; the re-executed process never re-executes again."""
    script = tmp_path / "probe.py"
    script.write_text(
        textwrap.dedent(f"""
        import importlib.util, json, os, sys
        print("start", flush=True)
        spec = importlib.util.spec_from_file_location("host_memory", {host_memory.__file__!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        note = mod.reexec_with_huge_pages()
        print(json.dumps({{"argv": sys.argv[1:], "utf8_mode": sys.flags.utf8_mode, "note": note,
                          "tunables": os.environ.get("GLIBC_TUNABLES", ""),
                          "keep": os.environ.get("PROBE_KEEP")}}))
    """)
    )
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory._RERUN_MARK)}
    base.update(PROBE_KEEP="kept", JAX_PLATFORMS="cpu")

    def run(extra):
        out = subprocess.run(
            [sys.executable, "-X", "utf8", str(script), "--flag", "two words"],
            env={**base, **extra},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.splitlines()
        return out[:-1], json.loads(out[-1])

    reason = unavailable_reason(
        base, libc=host_memory.libc_version(), thp=thp_mode(), plugins=host_memory.accelerator_plugins()
    )
    starts, report = run({})
    assert report["argv"] == ["--flag", "two words"] and report["utf8_mode"] == 1 and report["keep"] == "kept"
    if reason is None:
        assert starts == ["start", "start"] and report["note"] is None
        assert f"{TUNABLE}=1" in report["tunables"].split(":")
    else:
        assert starts == ["start"] and report["tunables"] == "" and report["note"] == reason

    starts, report = run({"JAX_PLATFORMS": "cuda"})
    assert starts == ["start"] and report["tunables"] == "" and "CPU backend only" in report["note"]

    starts, report = run({host_memory._RERUN_MARK: "1"})  # as if glibc had dropped the tunable on the rerun
    assert starts == ["start"] and report["tunables"] == "" and report["note"] is None


def test_importing_host_memory_does_not_import_jax():
    """`owl-train --huge_pages` imports it before JAX and may then replace the process: the package's names
    load lazily."""
    code = (
        "import sys, owl_jax.cli.host_memory; "
        "print(sorted(m for m in ('jax', 'flax', 'numpy') if m in sys.modules));"
        "import owl_jax; owl_jax.Owl; print('jax' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.splitlines()
    assert out == ["[]", "True"]
