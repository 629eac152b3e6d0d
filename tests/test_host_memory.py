"""Huge pages for the host's malloc: when `train.py` runs itself again with `glibc.malloc.hugetlb=1`,
and that the re-executed process keeps its arguments, interpreter options and environment."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from owl_jax import host_memory
from owl_jax.host_memory import TUNABLE, huge_page_env, thp_mode

GLIBC = ("glibc", "2.36")


def test_env_adds_the_tunable_and_keeps_everything_else():
    env = huge_page_env({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, libc=GLIBC,
                        thp="madvise", system="linux")
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}=1"
    assert env["PATH"] == "/bin"
    assert huge_page_env({}, libc=("glibc", "2.35"), thp="always", system="linux")["GLIBC_TUNABLES"] == \
        f"{TUNABLE}=1"


@pytest.mark.parametrize("environ, libc, thp, system", [
    ({}, GLIBC, "madvise", "darwin"),                                  # not Linux
    ({}, ("glibc", "2.34"), "madvise", "linux"),                       # glibc without the tunable
    ({}, ("", ""), "madvise", "linux"),                                # another C library
    ({}, GLIBC, "never", "linux"),                                     # huge pages off in the kernel
    ({}, GLIBC, None, "linux"),                                        # no THP at all
    ({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, GLIBC, "madvise", "linux"),   # the user chose a value already
    ({"OWL_JAX_HUGE_PAGES": "0"}, GLIBC, "madvise", "linux"),          # opted out
    ({"OWL_JAX_HUGE_PAGES": "off"}, GLIBC, "madvise", "linux"),
])
def test_env_is_none_where_huge_pages_do_not_apply(environ, libc, thp, system):
    assert huge_page_env(environ, libc=libc, thp=thp, system=system) is None


def test_a_rerun_process_never_reexecutes_again():
    env = huge_page_env({}, libc=GLIBC, thp="madvise", system="linux")
    env.pop("GLIBC_TUNABLES")  # as if glibc had dropped it (secure-execution mode)
    assert huge_page_env(env, libc=GLIBC, thp="madvise", system="linux") is None


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
    the report shows the tunable; with the opt-out, or where it does not apply, the script runs once."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(f"""
        import importlib.util, json, os, sys
        print("start", flush=True)
        spec = importlib.util.spec_from_file_location("host_memory", {host_memory.__file__!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.reexec_with_huge_pages()
        print(json.dumps({{"argv": sys.argv[1:], "utf8_mode": sys.flags.utf8_mode,
                          "tunables": os.environ.get("GLIBC_TUNABLES", ""),
                          "keep": os.environ.get("PROBE_KEEP")}}))
    """))
    base = {k: v for k, v in os.environ.items()
            if k not in ("GLIBC_TUNABLES", "OWL_JAX_HUGE_PAGES", "OWL_JAX_HUGE_PAGES_RERUN")}
    base["PROBE_KEEP"] = "kept"

    def run(extra):
        out = subprocess.run([sys.executable, "-X", "utf8", str(script), "--flag", "two words"], env={**base, **extra},
                             capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
        return out[:-1], json.loads(out[-1])

    applies = huge_page_env(base, libc=host_memory.libc_version(), thp=thp_mode()) is not None
    starts, report = run({})
    assert report["argv"] == ["--flag", "two words"] and report["utf8_mode"] == 1 and report["keep"] == "kept"
    if applies:
        assert starts == ["start", "start"]
        assert f"{TUNABLE}=1" in report["tunables"].split(":")
    else:
        assert starts == ["start"] and report["tunables"] == ""

    starts, report = run({"OWL_JAX_HUGE_PAGES": "0"})
    assert starts == ["start"] and report["tunables"] == ""


def test_importing_host_memory_does_not_import_jax():
    """`train.py` imports it first and may then replace the process: the package's names load lazily."""
    code = ("import sys, owl_jax.host_memory; print(sorted(m for m in ('jax', 'flax', 'numpy') if m in sys.modules));"
            "import owl_jax; owl_jax.Owl; print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True).stdout.splitlines()
    assert out == ["[]", "True"]
