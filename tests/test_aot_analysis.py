"""Matmul FLOPs read from optimized HLO text: XLA's rematerialization clones told apart from the program's own."""

from owl_jax.aot import analysis

# A loop of 4 iterations. Its body's fusion %up (a 2x4 @ 4x8 product) was cloned by XLA's rematerialization
# as %up.remat for a later use while %up still runs for the first: the product runs twice per iteration.
# %down.remat2 is a clone of a clone whose originals lost every use and were dropped (a move: it runs once),
# and %act.remat_compressed is a copy that keeps a value in a smaller layout (no product).
TEXT = """HloModule m

%up_fused (a: f32[2,4], w: f32[4,8]) -> f32[2,8] {
  %a = f32[2,4] parameter(0)
  %w = f32[4,8] parameter(1)
  ROOT %d = f32[2,8] dot(%a, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%up_fused.clone (a: f32[2,4], w: f32[4,8]) -> f32[2,8] {
  %a = f32[2,4] parameter(0)
  %w = f32[4,8] parameter(1)
  ROOT %d = f32[2,8] dot(%a, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%down_fused (h: f32[2,8], v: f32[8,4]) -> f32[2,4] {
  %h = f32[2,8] parameter(0)
  %v = f32[8,4] parameter(1)
  ROOT %d = f32[2,4] dot(%h, %v), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (p: (f32[2,4], f32[4,8], f32[8,4])) -> (f32[2,4], f32[4,8], f32[8,4]) {
  %p = (f32[2,4], f32[4,8], f32[8,4]) parameter(0)
  %x = f32[2,4] get-tuple-element(%p), index=0
  %w = f32[4,8] get-tuple-element(%p), index=1
  %v = f32[8,4] get-tuple-element(%p), index=2
  %up = f32[2,8] fusion(%x, %w), kind=kOutput, calls=%up_fused
  %act = f32[2,8] tanh(%up)
  %act.remat_compressed = f32[2,8] copy(%act)
  %down.remat2 = f32[2,4] fusion(%act.remat_compressed, %v), kind=kOutput, calls=%down_fused
  %up.remat = f32[2,8] fusion(%x, %w), kind=kOutput, calls=%up_fused.clone
  %sum = f32[2,8] add(%up.remat, %act)
  %back = f32[2,4] fusion(%sum, %v), kind=kOutput, calls=%down_fused
  %next = f32[2,4] add(%back, %down.remat2)
  ROOT %t = (f32[2,4], f32[4,8], f32[8,4]) tuple(%next, %w, %v)
}

%c (p: (f32[2,4], f32[4,8], f32[8,4])) -> pred[] {
  %p = (f32[2,4], f32[4,8], f32[8,4]) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[2,4], w: f32[4,8], v: f32[8,4]) -> f32[2,4] {
  %x = f32[2,4] parameter(0)
  %w = f32[4,8] parameter(1)
  %v = f32[8,4] parameter(2)
  %t = (f32[2,4], f32[4,8], f32[8,4]) tuple(%x, %w, %v)
  %l = (f32[2,4], f32[4,8], f32[8,4]) while(%t), condition=%c, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %out = f32[2,4] get-tuple-element(%l), index=0
}
"""

PRODUCT = 2 * 2 * 4 * 8  # either product: 2x4 @ 4x8 or 2x8 @ 8x4


def test_each_fusion_call_counts_its_products_once_per_run():
    module = analysis.HloModule.parse(TEXT)
    # per iteration: %up, %up.remat, %down.remat2 and %back (%down_fused called twice, counted per call)
    assert analysis.matmul_flops(module) == 4 * 4 * PRODUCT
    assert module.executions["%down_fused"] == 2 * 4 and module.unknown_trip_counts == 0


def test_only_clones_whose_original_still_runs_are_rematerialization():
    module = analysis.HloModule.parse(TEXT)
    assert analysis.rematerialized_flops(module) == 4 * PRODUCT  # %up.remat; %down.remat2 is a move
    without_clones = TEXT.replace("%up.remat", "%up2")  # the same program, no name says a clone
    assert analysis.rematerialized_flops(analysis.HloModule.parse(without_clones)) == 0
