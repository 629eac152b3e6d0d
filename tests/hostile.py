"""The fault campaign's sizes: a few seconds per campaign by default, long on demand.

`pytest --hostile-long` (or `OWL_JAX_HOSTILE_LONG=1` in the environment) runs the long campaign: more
hypothesis examples, more random kills, more corrupted files. Campaign tests are marked `hostile` and
take their sizes from `sized(short, long)` so both modes run the same code.
"""

import os

import hypothesis

ENV = "OWL_JAX_HOSTILE_LONG"


def long_mode() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes")


def sized(short: int, long: int) -> int:
    """`short` in the default campaign, `long` under --hostile-long."""
    return long if long_mode() else short


def examples(short: int = 40, long: int = 2000) -> hypothesis.settings:
    """hypothesis settings for one property: `short` examples by default, `long` under --hostile-long."""
    return hypothesis.settings(
        max_examples=sized(short, long),
        deadline=None,
        derandomize=not long_mode(),  # the default campaign is the same on every run; the long one explores
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
