"""What a compiled program needs and does, read from the executable and its optimized HLO.

- `memory_summary`: the bytes XLA's buffer assignment reports per device (arguments, outputs, temporaries,
  output bytes living in donated argument buffers, and the most the program holds at once).
- `collective_summary`: the collectives one run executes per device, by kind, with the bytes of their results.
- `matmul_flops`: the FLOPs of the program's dots and convolutions per device for one run;
  `rematerialized_flops`: the part of them XLA's own rematerialization adds.
- `kernel_calls` / `hlo_has_splash`: the Mosaic (Pallas) kernels the program calls.

XLA's own `cost_analysis()` counts the body of a `while` loop once, and a scan over layers is one: a model
whose 32 layers are scanned would show one layer's FLOPs. Here every computation is weighted by how often one
run executes it: a loop body by its trip count, read from XLA's `known_trip_count` annotation where present,
else from the loop itself (`while (i < N) { ...; i += step }`: the condition's bound, the counter's start in
the loop's input and its step in the body). A loop of another form counts once and is tallied in
`HloModule.unknown_trip_counts`. Matmul FLOPs are 2 × the multiply-adds of each dot and convolution as XLA's
cost model counts them (for a convolution, only the window positions that meet a real input element: TPU
programs write batched products as dilated convolutions), the quantity `owl_jax.training.flops` counts.
Custom-call kernels are opaque, their FLOPs not counted (see `kernel_calls`).

Near the HBM limit XLA's rematerialization clones an instruction (`%x.remat`, `%x.remat2`) to compute it again
rather than hold its result: extra work where the original still runs (`rematerialized_flops`), else a move.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2}
_DTYPE_BYTES |= {"s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9a-z]*)?)\[([0-9,]*)\]")
_CALLEES = re.compile(r"\b(?:calls|to_apply|body|true_computation|false_computation)=(%[\w.\-]+)")
_CALLEE_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_REMAT = re.compile(r"\.remat\d*(?:\.\d+)?$")  # XLA's rematerialization clone: `%x.remat`, `%x.remat2.1`


def memory_summary(compiled: Any) -> dict[str, int]:
    """Per-device bytes of a compiled program: `argument_bytes`, `output_bytes`, `temp_bytes`,
    `alias_bytes` (output bytes in donated argument buffers) and `peak_bytes` (the most it holds at once;
    arguments + outputs - aliases + temporaries where the backend reports no peak)."""
    m = compiled.memory_analysis()
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }
    held = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    out["peak_bytes"] = int(getattr(m, "peak_memory_in_bytes", 0) or held)
    return out


def collective_summary(compiled: Any) -> dict[str, tuple[int, int]]:
    """`{kind: (executions, bytes)}` per device for one run of `compiled` (or of an `HloModule`), for the
    kinds in `COLLECTIVES` that occur: `-start` forms count as their kind, bytes are those of the results
    (of an async start, its destination buffer), loop bodies count once per iteration."""
    module = _module(compiled)
    totals: dict[str, list[int]] = {}
    for comp, times in module.executions.items():
        c = module.computations.get(comp)
        if c is None or _is_async_done(c):  # an async collective's done half repeats its start's operation
            continue
        for ins in c.instructions:
            kind = ins.opcode.removesuffix("-start")
            if kind not in COLLECTIVES:
                continue
            arrays = _top_level(ins.shape)
            if ins.opcode.endswith("-start") and kind != "all-reduce" and len(arrays) >= 2:
                arrays = [arrays[1]]  # (sources, destinations, [context...])
            entry = totals.setdefault(kind, [0, 0])
            entry[0] += times
            entry[1] += times * sum(shape_bytes(a) for a in arrays)
    return {k: (v[0], v[1]) for k, v in sorted(totals.items())}


def matmul_flops(compiled: Any) -> float:
    """2 × multiply-adds of every dot and convolution per device for one run (loop bodies × trip count)."""
    module = _module(compiled)
    total = 0.0
    for comp, times in module.executions.items():
        c = module.computations.get(comp)
        if c is not None:
            total += times * sum(_matmul_flops(ins, c) for ins in c.instructions)
    return total


def rematerialized_flops(compiled: Any) -> float:
    """The part of `matmul_flops(compiled)` XLA's rematerialization adds, per device for one run: of each
    original's copies in a computation (`%x`, `%x.remat`, ...), all but the costliest (fusions: their callees)."""
    module = _module(compiled)
    called: dict[str, float] = {}
    total = 0.0
    for comp, times in module.executions.items():  # every computation it names is in the module
        c = module.computations[comp]
        copies: dict[str, list[Instruction]] = {}
        for ins in c.instructions:
            copies.setdefault(_REMAT.sub("", ins.name), []).append(ins)
        for group in copies.values():
            if len(group) > 1 and any(_REMAT.search(ins.name) for ins in group):
                each = [_instruction_flops(module, ins, c, called) for ins in group]
                total += times * (sum(each) - max(each))
    return total


def kernel_calls(compiled: Any) -> dict[str, int]:
    """`{kernel name: executions per run}` of the Mosaic (Pallas TPU) kernels the program calls."""
    module = _module(compiled)
    calls: Counter = Counter()
    for comp, times in module.executions.items():
        for ins in module.computations[comp].instructions if comp in module.computations else ():
            if ins.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in ins.attributes:
                calls[re.sub(r"\.\d+$", "", ins.name.lstrip("%"))] += times
    return dict(calls)


def hlo_has_splash(compiled: Any) -> bool:
    """Whether the program calls a splash-attention kernel (forward or backward)."""
    return any(name.startswith("splash") for name in kernel_calls(compiled))


# -- the HLO module ------------------------------------------------------------------------------------
@dataclass
class Instruction:
    name: str
    shape: str  # the result shape as printed: an array or a tuple
    opcode: str
    args: str  # the text inside the parentheses: operand names, or a constant's literal
    attributes: str  # everything after them

    @property
    def operands(self) -> list[str]:
        return re.findall(r"%[\w.\-]+", self.args)

    def callees(self) -> list[str]:
        if self.opcode in ("async-update", "async-done"):  # they name their async-start's computation
            return []
        found = _CALLEES.findall(self.attributes)
        for group in _CALLEE_LISTS.findall(self.attributes):
            found += [c.strip() for c in group.split(",") if c.strip()]
        return found


@dataclass
class Computation:
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    @functools.cached_property
    def by_name(self) -> dict[str, Instruction]:
        return {i.name: i for i in self.instructions}

    @property
    def root(self) -> Instruction | None:
        return self.instructions[-1] if self.instructions else None


@dataclass
class HloModule:
    """An optimized HLO module's computations, parsed from its text (`compiled.as_text()`)."""

    computations: dict[str, Computation]
    entry: str
    unknown_trip_counts: int = 0

    @classmethod
    def parse(cls, text: str) -> HloModule:
        computations: dict[str, Computation] = {}
        entry, current, lines = "", None, []

        def flush() -> None:
            if current is not None and lines:
                ins = _instruction(" ".join(lines))
                if ins is not None:
                    current.instructions.append(ins)
            lines.clear()

        for line in text.splitlines():
            if current is None:
                if line.rstrip().endswith("{") and (line.startswith("%") or line.startswith("ENTRY ")):
                    head = line.split("(", 1)[0].split()
                    current = computations.setdefault(head[-1], Computation(head[-1]))
                    entry = head[-1] if head[0] == "ENTRY" else entry
            elif line.rstrip() == "}":
                flush()
                current = None
            elif line.startswith("  "):  # a new instruction; anything else continues the last one
                flush()
                lines.append(line.strip().removeprefix("ROOT "))
            else:
                lines.append(line)
        return cls(computations, entry)

    @functools.cached_property
    def executions(self) -> dict[str, int]:
        """Computation → how many times one run of the entry executes it (call sites × trip counts)."""
        counts: Counter = Counter()

        def visit(name: str, times: int) -> None:
            counts[name] += times
            for ins in self.computations[name].instructions:
                factor = self._trip_count(ins, self.computations[name]) if ins.opcode == "while" else 1
                for callee in ins.callees():
                    if callee in self.computations:
                        visit(callee, times * factor)

        if self.entry in self.computations:
            visit(self.entry, 1)
        return dict(counts)

    def _trip_count(self, loop: Instruction, caller: Computation) -> int:
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attributes)
        if known:
            return int(known.group(1))
        body, cond = (re.search(rf"\b{k}=(%[\w.\-]+)", loop.attributes) for k in ("body", "condition"))
        count = None
        if body and cond and body.group(1) in self.computations and cond.group(1) in self.computations:
            count = _counted_loop(self.computations[cond.group(1)], self.computations[body.group(1)], loop, caller)
        if count is None:
            self.unknown_trip_counts += 1
            return 1
        return count


def _module(compiled: Any) -> HloModule:
    return compiled if isinstance(compiled, HloModule) else HloModule.parse(compiled.as_text())


def _instruction(line: str) -> Instruction | None:
    """`%name = shape opcode(args), attributes` → Instruction (None for a line of another form)."""
    if " = " not in line:
        return None
    name, rest = line.split(" = ", 1)
    if rest.startswith("("):  # a tuple shape, up to its matching parenthesis
        end = _matching(rest, 0)
        shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    match = re.match(r"([\w\-]+)\(", rest)
    if not match:
        return None
    end = _matching(rest, match.end() - 1)
    return Instruction(name.strip(), shape, match.group(1), rest[match.end() : end], rest[end + 1 :])


def _matching(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return len(text)


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(shape)]


def _top_level(shape: str) -> list[str]:
    """The elements of a tuple shape (nested tuples kept whole), or `[shape]`."""
    if not shape.startswith("("):
        return [shape]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(shape):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if (ch == "," and depth == 1) or (ch == ")" and depth == 0):
            parts.append(re.sub(r"/\*.*?\*/", "", shape[start:i]).strip())
            start = i + 1
    return [p for p in parts if p]


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (a tuple: its arrays summed)."""
    return int(sum(_DTYPE_BYTES.get(dt, 0) * math.prod(dims) for dt, dims in _arrays(shape)))


def _is_async_done(comp: Computation) -> bool:
    root = comp.root
    return root is not None and 'custom_call_target="AsyncCollectiveDone"' in root.attributes


# -- loops ---------------------------------------------------------------------------------------------
def _counted_loop(cond: Computation, body: Computation, loop: Instruction, caller: Computation) -> int | None:
    root = cond.root
    if root is None or root.opcode != "compare" or len(root.operands) != 2:
        return None
    direction = re.search(r"direction=(\w+)", root.attributes)
    counter, bound = (cond.by_name.get(o) for o in root.operands)
    if counter is None or bound is None or counter.opcode != "get-tuple-element" or direction is None:
        return None
    if direction.group(1) not in ("LT", "LE", "NE"):
        return None
    index = int(re.search(r"index=(\d+)", counter.attributes).group(1))
    limit, step = _value(cond, bound), _increment(body, index)
    start = _tuple_element(caller, loop.operands[0], index) if loop.operands else None
    if limit is None or not step or step < 0:
        return None
    span = limit - (start or 0) + (1 if direction.group(1) == "LE" else 0)
    return max(0, -(-span // step))


def _value(comp: Computation, ins: Instruction | None) -> int | None:
    """The integer a scalar constant (seen through copies and conversions) holds, or None."""
    for _ in range(8):
        if ins is None or ins.opcode not in ("copy", "bitcast", "convert", "reshape"):
            break
        ins = comp.by_name.get(ins.operands[0]) if ins.operands else None
    if ins is None or ins.opcode != "constant" or not re.fullmatch(r"-?\d+", ins.args.strip()):
        return None
    return int(ins.args.strip())


def _tuple_element(comp: Computation, name: str, index: int) -> int | None:
    tup = comp.by_name.get(name)
    if tup is None or tup.opcode != "tuple" or index >= len(tup.operands):
        return None
    return _value(comp, comp.by_name.get(tup.operands[index]))


def _increment(body: Computation, index: int) -> int | None:
    root = body.root
    if root is None or root.opcode != "tuple" or index >= len(root.operands):
        return None
    update = body.by_name.get(root.operands[index])
    if update is None or update.opcode != "add":
        return None
    values = [_value(body, body.by_name.get(o)) for o in update.operands]
    return next((v for v in values if v is not None), None)


# -- matmul FLOPs --------------------------------------------------------------------------------------
def _matmul_flops(ins: Instruction, comp: Computation) -> float:
    if ins.opcode not in ("dot", "convolution") or len(ins.operands) < 2:
        return 0.0
    shapes = [comp.by_name.get(o) for o in ins.operands[:2]]
    if any(s is None for s in shapes):
        return 0.0
    (_, lhs), (_, rhs) = (_arrays(s.shape)[0] for s in shapes)
    out = _arrays(ins.shape)[0][1]
    if ins.opcode == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attributes)
        dims = [int(d) for d in contracting.group(1).split(",") if d] if contracting else []
        return 2.0 * math.prod(out) * math.prod(lhs[d] for d in dims)
    return 2.0 * _convolution_fmas(ins.attributes, lhs, rhs, out)


def _instruction_flops(module: HloModule, ins: Instruction, comp: Computation, memo: dict[str, float]) -> float:
    """One execution's matmul FLOPs of `ins` and the computations it calls (XLA rematerializes no loop)."""

    def of(name: str) -> float:
        if name not in memo:
            c = module.computations[name]
            memo[name] = sum(_instruction_flops(module, i, c, memo) for i in c.instructions)
        return memo[name]

    return _matmul_flops(ins, comp) + sum(of(k) for k in ins.callees() if k in module.computations)


def _convolution_fmas(attributes: str, lhs: tuple, rhs: tuple, out: tuple) -> float:
    """Multiply-adds of a convolution as XLA's cost model counts them (valid window positions only)."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attributes)
    if not labels:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    groups = {k: int(v) for k, v in re.findall(r"(feature_group_count|batch_group_count)=(\d+)", attributes)}
    fmas = lhs[lhs_l.index("f")] / groups.get("feature_group_count", 1)
    fmas *= out[out_l.index("f")] * lhs[lhs_l.index("b")] / groups.get("batch_group_count", 1)
    window = re.search(r"window=\{([^}]*)\}", attributes)
    fields = dict(f.split("=", 1) for f in window.group(1).split()) if window else {}
    spatial = sorted(c for c in lhs_l if c.isdigit())
    for i, d in enumerate(spatial):

        def at(key: str, default: int, i: int = i) -> int:
            return int(fields[key].split("x")[i]) if key in fields else default

        pad_low = int(fields["pad"].split("x")[i].split("_")[0]) if "pad" in fields else 0
        fmas *= _valid_positions(
            out[out_l.index(d)], rhs[rhs_l.index(d)], lhs[lhs_l.index(d)], at("stride", 1), pad_low,
            at("rhs_dilate", 1), at("lhs_dilate", 1),
        )  # fmt: skip
    return float(fmas)


@functools.cache
def _valid_positions(outputs: int, kernel: int, inputs: int, stride: int, pad_low: int, wd: int, bd: int) -> int:
    """(output, kernel) index pairs of one spatial dimension that land on an input element."""
    total = 0
    o = np.arange(outputs, dtype=np.int64)[:, None]
    for k0 in range(0, kernel, max(1, (1 << 22) // max(outputs, 1))):
        k = np.arange(k0, min(kernel, k0 + max(1, (1 << 22) // max(outputs, 1))), dtype=np.int64)[None, :]
        u = o * stride - pad_low + k * wd
        total += int(np.count_nonzero((u >= 0) & (u % bd == 0) & (u // bd < inputs)))
    return total
