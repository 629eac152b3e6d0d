"""The HBM traffic estimate read from optimized HLO (`owl_jax.aot.traffic`), on hand-written programs."""

from owl_jax.aot import analysis, traffic

# A scan over 4 stacked layers: each iteration slices one (16, 16) f32 layer out of the (4, 16, 16) stack
# inside a fusion, multiplies, and writes its (1, 16, 16) result into a (4, 16, 16) output in place. One
# buffer lives in the core's memory (S(1)) and moves nothing.
SCAN = """HloModule m

%fused_slice (param_0: f32[4,16,16], param_1: s32[], param_2: f32[16,16]) -> f32[16,16] {
  %param_0 = f32[4,16,16]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %w = f32[1,16,16]{2,1,0} dynamic-slice(%param_0, %param_1, %zero, %zero), dynamic_slice_sizes={1,16,16}
  %w2 = f32[16,16]{1,0} bitcast(%w)
  %param_2 = f32[16,16]{1,0} parameter(2)
  ROOT %y = f32[16,16]{1,0} dot(%param_2, %w2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_update (param_0: f32[4,16,16], param_1: f32[16,16], param_2: s32[]) -> f32[4,16,16] {
  %param_0 = f32[4,16,16]{2,1,0} parameter(0)
  %param_1 = f32[16,16]{1,0} parameter(1)
  %u = f32[1,16,16]{2,1,0} bitcast(%param_1)
  %param_2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %dus = f32[4,16,16]{2,1,0} dynamic-update-slice(%param_0, %u, %param_2, %zero, %zero)
}

%cond (p: (s32[], f32[16,16], f32[4,16,16], f32[4,16,16])) -> pred[] {
  %p = (s32[], f32[16,16], f32[4,16,16], f32[4,16,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[16,16], f32[4,16,16], f32[4,16,16])) -> (s32[], f32[16,16], f32[4,16,16], f32[4,16,16]) {
  %p = (s32[], f32[16,16], f32[4,16,16], f32[4,16,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[16,16]{1,0} get-tuple-element(%p), index=1
  %stack = f32[4,16,16]{2,1,0} get-tuple-element(%p), index=2
  %out = f32[4,16,16]{2,1,0} get-tuple-element(%p), index=3
  %y = f32[16,16]{1,0} fusion(%stack, %i, %x), kind=kOutput, calls=%fused_slice
  %v = f32[16,16]{1,0:S(1)} copy(%y)
  %o = f32[4,16,16]{2,1,0} fusion(%out, %y, %i), kind=kLoop, calls=%fused_update
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[16,16], f32[4,16,16], f32[4,16,16]) tuple(%next, %y, %stack, %o)
}

ENTRY %main (x: f32[16,16], stack: f32[4,16,16], out: f32[4,16,16]) -> f32[4,16,16] {
  %x = f32[16,16]{1,0} parameter(0)
  %stack = f32[4,16,16]{2,1,0} parameter(1)
  %out = f32[4,16,16]{2,1,0} parameter(2)
  %zero = s32[] constant(0)
  %t = (s32[], f32[16,16], f32[4,16,16], f32[4,16,16]) tuple(%zero, %x, %stack, %out)
  %w = (s32[], f32[16,16], f32[4,16,16], f32[4,16,16]) while(%t), condition=%cond, body=%body
  ROOT %r = f32[4,16,16]{2,1,0} get-tuple-element(%w), index=3
}
"""


def test_a_scan_reads_one_layer_per_iteration_and_writes_its_slice():
    module = analysis.HloModule.parse(SCAN)
    layer = 16 * 16 * 4  # bytes of one f32 (16, 16) array
    per_iteration = (
        (layer + layer + layer)  # the slicing fusion: one layer of the stack, x in, y out (the index: 4 bytes)
        + 4
        + layer  # the copy reads y; its result is in the core's memory
        + (layer + 4 + layer)  # the update fusion: reads y and the index, writes one slice in place
        + 4 * 3  # the counter's add: two s32 in, one out
    )
    assert traffic.hbm_bytes(module) == 4 * per_iteration
    assert module.executions["%body"] == 4


def test_memory_spaces_other_than_hbm_are_not_counted():
    assert traffic.array_hbm_bytes("f32[8,128]{1,0:T(8,128)}") == 8 * 128 * 4
    assert traffic.array_hbm_bytes("f32[8,128]{1,0:T(8,128)S(1)}") == 0
    assert traffic.array_hbm_bytes("(bf16[4]{0}, s8[16]{0:S(1)})") == 8
