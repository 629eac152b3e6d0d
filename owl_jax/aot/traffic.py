"""The bytes a compiled program moves between HBM and the cores per run, read from its optimized HLO.

A step cannot finish faster than its HBM traffic divided by the chip's bandwidth; with the FLOPs bound
(`train_plan.TrainCompile.min_step_seconds`) this bounds the step from below. The count is an estimate of the
program as scheduled:

- Every top-level instruction of the program's control computations (the entry, loop bodies and conditions,
  called and branch computations; a loop body times its trip count, as `analysis.HloModule.executions`
  weighs it) reads its operands and writes its result. A fusion is one instruction: what happens inside it
  stays on the core.
- Arrays the compiler placed in the core's own memory (a layout with memory space `S(1)` or above: VMEM
  on a TPU) are not HBM traffic; a prefetch (`copy-start`) into it reads HBM once.
- In-place slicing is counted by the slice: a fusion operand used only by `dynamic-slice` reads the slices,
  and one used only as the buffer a `dynamic-update-slice` writes into is not read, the fusion writing only
  the update. (A scan over stacked layer weights reads one layer per iteration, not the stack.)
- Shape-only instructions (bitcast, tuple, get-tuple-element, parameters, constants) move nothing; an async
  operation is counted once, at its start.
"""

from __future__ import annotations

import math
import re
from typing import Any

from owl_jax.aot.analysis import _DTYPE_BYTES, Computation, HloModule, Instruction, _module, _top_level

_ARRAY_LAYOUT = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9a-z]*)?)\[([0-9,]*)\](\{[^}]*\})?")
_CONTROL = ("while", "call", "conditional", "async-start", "async-update", "async-done")
_FREE = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional", "after-all",
    "partition-id", "replica-id", "opt-barrier", "add-dependency", "copy-done", "async-update", "async-done",
    "all-gather-done", "all-reduce-done", "collective-permute-done", "send-done", "recv-done",
}  # fmt: skip


def hbm_bytes(compiled: Any) -> float:
    """Bytes read from and written to HBM per device in one run of `compiled` (or of an `HloModule`)."""
    module = _module(compiled)
    inside = _called_from_instructions(module)
    total = 0.0
    for name, times in module.executions.items():
        comp = module.computations.get(name)
        if comp is None or name in inside:
            continue
        total += times * sum(_instruction_bytes(ins, comp, module) for ins in comp.instructions)
    return total


def array_hbm_bytes(shape: str) -> int:
    """Bytes of the arrays of an HLO shape string that live in HBM (memory space 0)."""
    total = 0
    for dtype, dims, layout in _ARRAY_LAYOUT.findall(shape):
        space = re.search(r"S\((\d+)\)", layout or "")
        if space and int(space.group(1)) != 0:
            continue
        total += _DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def _called_from_instructions(module: HloModule) -> set[str]:
    """Computations run as part of one instruction (fusion bodies, reducers, kernels), and what they call."""
    inside: set[str] = set()
    stack = [
        callee
        for comp in module.computations.values()
        for ins in comp.instructions
        if ins.opcode not in _CONTROL
        for callee in ins.callees()
    ]
    while stack:
        name = stack.pop()
        if name in inside or name not in module.computations:
            continue
        inside.add(name)
        stack += [c for ins in module.computations[name].instructions for c in ins.callees()]
    return inside


def _instruction_bytes(ins: Instruction, comp: Computation, module: HloModule) -> float:
    if ins.opcode in _FREE:
        return 0.0
    operands = [comp.by_name.get(o) for o in ins.operands]
    if ins.opcode == "fusion":
        return _fusion_bytes(ins, operands, module)
    read = sum(array_hbm_bytes(o.shape) for o in operands if o is not None)
    result = _top_level(ins.shape)
    if ins.opcode == "copy-start" and result:  # (destination, source, context): the source is the operand
        result = [result[0]]
    elif ins.opcode.endswith("-start") and len(result) >= 2:  # (sources, destinations, [context...])
        result = [result[1]]
    return float(read + sum(array_hbm_bytes(r) for r in result))


def _fusion_bytes(ins: Instruction, operands: list[Instruction | None], module: HloModule) -> float:
    callees = ins.callees()
    body = module.computations.get(callees[0]) if callees else None
    if body is None:
        return float(sum(array_hbm_bytes(o.shape) for o in operands if o is not None) + array_hbm_bytes(ins.shape))
    params = _parameters(body)
    read, in_place = 0.0, set()
    for index, operand in enumerate(operands):
        if operand is None:
            continue
        param = params.get(index)
        use = _use(body, param.name, module) if param is not None else None
        if use == "in_place":
            in_place.add(param.name)  # written in place: the update is counted as the fusion's output
        elif use is not None:  # sliced: the slices' elements at the operand's dtype
            read += min(array_hbm_bytes(operand.shape), _bytes_like(operand.shape, use))
        else:
            read += array_hbm_bytes(operand.shape)
    root = body.root
    outputs = [body.by_name.get(o) for o in root.operands] if root is not None and root.opcode == "tuple" else [root]
    shapes = _top_level(ins.shape)
    written = 0.0
    for k, out in enumerate(outputs):
        full = array_hbm_bytes(shapes[k]) if k < len(shapes) else 0
        while out is not None and out.opcode == "bitcast":
            out = body.by_name.get(out.operands[0])
        if out is not None and out.opcode == "dynamic-update-slice" and _source(body, out.operands[0]) in in_place:
            update = body.by_name.get(out.operands[1])
            written += min(full, _bytes_like(shapes[k], update.shape)) if update is not None else full
        else:
            written += full
    return float(read + written)


def _parameters(body: Computation) -> dict[int, Instruction]:
    return {int(re.match(r"\s*(\d+)", p.args).group(1)): p for p in body.instructions if p.opcode == "parameter"}


def _users(body: Computation, name: str) -> list[Instruction]:
    return [i for i in body.instructions if name in i.operands]


def _source(body: Computation, name: str) -> str:
    """`name`, seen back through the views of one array (bitcasts, single-operand fusions) to their source."""
    ins = body.by_name.get(name)
    while ins is not None and ins.opcode in ("bitcast", "fusion") and len(ins.operands) == 1:
        name, ins = ins.operands[0], body.by_name.get(ins.operands[0])
    return name


def _use(body: Computation, name: str, module: HloModule, depth: int = 0):
    """How a fusion uses the array `name`: `"in_place"` (only as the buffer dynamic-update-slices write into),
    the shape string of the slices it reads (only through dynamic-slice), or None (read whole). Views of
    the array and nested fusions are followed."""
    users = _users(body, name)
    if not users or depth > 8:
        return None
    found = []  # per use: "in_place", the slices' shape string, or None (read whole)
    for u in users:
        if u.opcode == "dynamic-slice" and u.operands[0] == name:
            found.append(u.shape)
        elif u.opcode == "dynamic-update-slice" and u.operands[0] == name:
            found.append("in_place")
        elif u.opcode == "bitcast" or (u.opcode == "fusion" and len(u.operands) == 1):  # a view of the array
            found.append(_use(body, u.name, module, depth + 1))
        elif u.opcode == "fusion" and u.callees() and u.callees()[0] in module.computations:
            nested = module.computations[u.callees()[0]]
            params = _parameters(nested)
            found += [
                _use(nested, params[i].name, module, depth + 1) if i in params else None
                for i, operand in enumerate(u.operands)
                if operand == name
            ]
        else:
            found.append(None)
    if all(f == "in_place" for f in found):
        return "in_place"
    if all(f not in (None, "in_place") for f in found):
        return "(" + ", ".join(found) + ")"
    return None


def _bytes_like(hbm_shape: str, shape: str) -> int:
    """Bytes of `shape`'s elements at the dtype of `hbm_shape`, or 0 when `hbm_shape` is not in HBM."""
    if not array_hbm_bytes(hbm_shape):
        return 0
    arrays = _ARRAY_LAYOUT.findall(shape)
    dtype = _ARRAY_LAYOUT.findall(hbm_shape)[0][0]
    return int(sum(_DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in a[1].split(",") if d) for a in arrays))
