"""Markdown tables of compile reports."""

from __future__ import annotations

from owl_jax.aot.train_plan import TrainCompile


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def flops(n: float) -> str:
    return f"{n:.4g}"


def xla_remat(r: TrainCompile) -> str:
    """What XLA's own rematerialization adds to the compiled FLOPs, and the ratio without it ("" if none)."""
    if not r.flops_xla_remat:
        return ""
    return (
        f"; XLA's rematerialization {flops(r.flops_xla_remat)} of them, "
        f"ratio {r.flops_ratio_without_xla_remat:.3f} without it"
    )


def table(r: TrainCompile) -> str:
    """One compile as a two-column markdown table."""
    mesh = " x ".join(f"{a} {r.mesh[a]}" for a in ("data", "fsdp", "tensor"))
    slices = f", {r.num_slices} slices" if r.num_slices > 1 else ""
    rows = [
        ("target", f"{r.target} ({r.topology}, {r.chips} chips{slices})"),
        ("stage", f"{r.stage} ({r.kind}); {r.trainable_params:,} trainable, {r.frozen_params:,} frozen parameters"),
        ("mesh", mesh),
        ("remat", r.remat),
        (
            "batch",
            f"{r.per_chip_batch} rows per chip, {r.global_batch} global, {r.seq_len} tokens, "
            f"{r.images_per_row} image(s) per row",
        ),  # fmt: skip
        ("optimizer state", f"{r.opt_state_elements:,} elements"),
    ]
    if not r.fits:
        rows.append(("fits", f"no: {r.error}"))
    else:
        m = r.memory
        share = m["peak_bytes"] / r.hbm_bytes
        rows += [
            ("fits", f"yes: peak {gib(m['peak_bytes'])} of {gib(r.hbm_bytes)} HBM ({share:.0%})"),
            (
                "per-chip bytes",
                f"arguments {gib(m['argument_bytes'])}, outputs {gib(m['output_bytes'])}, "
                f"temporaries {gib(m['temp_bytes'])}, aliased {gib(m['alias_bytes'])}",
            ),  # fmt: skip
            (
                "FLOPs per step",
                f"model {flops(r.flops_model)}, + remat {r.remat} recomputes {flops(r.flops_recompute)}; "
                f"outside kernels {flops(r.flops_model_in_hlo)}, compiled {flops(r.flops_compiled)}, "
                f"ratio {r.flops_ratio:.3f}" + xla_remat(r),
            ),  # fmt: skip
            ("step time at peak", f"{r.min_step_seconds * 1e3:.1f} ms (compiled FLOPs / chips / peak bf16 rate)"),
            (
                "HBM traffic",
                f"{gib(r.hbm_traffic_bytes)} per chip per step: {r.min_step_seconds_hbm * 1e3:.1f} ms at "
                f"{r.hbm_bytes_per_s / 1e9:.0f} GB/s",
            ),  # fmt: skip
            ("collectives", "; ".join(f"{k} {c} ({gib(b)})" for k, (c, b) in r.collectives.items()) or "none"),
            ("kernels", ", ".join(f"{k} x{c}" for k, c in r.kernel_calls.items()) or "none"),
        ]
    rows.append(("compile", f"{r.compile_seconds:.0f} s"))
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def search_table(
    best: dict[str, TrainCompile | None], winner: TrainCompile | None, attempts: list[TrainCompile] = ()
) -> str:
    """Per remat policy: its largest per-chip batch found (and the smallest that failed above it, among
    `attempts`), or that it fails at the winner's batch; the winner marked."""
    from owl_jax.aot.search import smallest_failure

    lines = ["| remat | per-chip batch | fits | peak | fails at | |", "|---|---|---|---|---|---|"]
    for policy, r in best.items():
        if r is None:
            lines.append(f"| {policy} | | not even 1 row | | | |")
        elif not r.fits:
            lines.append(f"| {policy} | {r.per_chip_batch} | no: {r.error} | | | |")
        else:
            mark = "chosen" if r is winner else ""
            above = smallest_failure(list(attempts), r) or ""
            lines.append(f"| {policy} | {r.per_chip_batch} | yes | {gib(r.memory['peak_bytes'])} | {above} | {mark} |")
    return "\n".join(lines)
