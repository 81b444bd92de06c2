"""The window kernels' loops as Triton compiles them for a GPU, on a machine without one.

    python scripts/compiled_loops.py            # every window kernel, and the 12-line repro below
    python scripts/compiled_loops.py --check    # exit 1 if a window kernel carries a scalar through a loop

Triton 3.4.0 to 3.7.1 (checked: 3.4.0, 3.5.1, 3.6.0, 3.7.1; 3.8.0 and 3.9.0 are right) miscompile
a loop that carries a scalar into a nested loop's bounds:

    lo = tl.program_id(0) * 0
    for c0 in range(0, N, BT):
        hi = ...c0...
        for kb in range(lo, hi, BT):   # compiled: range(0, hi, BT) on every c0
            ...
        lo = hi

Triton's own IR (TTIR) carries `lo` through the outer loop; the GPU pass
tritongpu-remove-layout-conversions drops it and puts its first value, 0, in the inner loop's
lower bound. The interpreter runs the Python, so there the kernel is right. That is what made the
window kernel wrong on an H200 with Triton 3.6.0 (docs/kernels.md, known limits): its linear
state re-added every old key on each query block after the first that had some. The kernels no
longer carry a scalar through any loop; `--check` holds them to it.

Each kernel is compiled for sm_90 (Hopper) through ptxas, which Triton's wheel ships: no GPU or
CUDA driver is needed. For each loop the script prints its lower bound, upper bound and the
scalar values it carries, in TTIR and in TTGIR (after the GPU passes, which add their own
counters and tokens to pipelined loops).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compiled_loops: unset TRITON_INTERPRET: this script compiles the kernels, it does not interpret them")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linearize.ops.window import triton as window  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# scf.for %iv = %lb to %ub step %st iter_args(...) -> (result types)
LOOP = re.compile(r"scf\.for %\S+ = (%\S+) to (%\S+) step \S+(?: iter_args\((.*?)\) -> \((.*?)\))?\s*: i\d+ \{")
SCALAR = re.compile(r"^(i\d+|f\d+|bf16|index)$")


def compile_kernel(fn, signature: dict[str, str], constexprs: dict[str, object], num_warps: int = 8):
    """fn compiled for TARGET: signature maps each parameter to a Triton type ('*fp32', 'i32',
    'fp32') or 'constexpr' with its value in constexprs."""
    names = fn.arg_names
    missing = [n for n in names if n not in signature]
    if missing:
        raise KeyError(f"{fn.__name__}: no type for {missing}")
    values = {(names.index(n),): v for n, v in constexprs.items()}
    src = ASTSource(fn=fn, signature={n: signature[n] for n in names}, constexprs=values)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps})


def loops(ir: str) -> list[tuple[str, str, int]]:
    """(lower bound, upper bound, scalars carried) of each scf.for in an IR text, in order."""
    out = []
    for lb, ub, _, results in LOOP.findall(ir):
        types = [t.strip() for t in re.split(r",\s*(?![^<]*>)", results)] if results else []
        out.append((lb, ub, sum(bool(SCALAR.match(t)) for t in types)))
    return out


def window_cases():
    """Each window kernel as the host launches it: fp32 and bf16 inputs, with and without a
    starting state, LLaMA-3-8B's head dim and the default blocks."""
    blocks = dict(DK=128, F=64, D=128, BT=64, BK=128, BF=64, BV=64)
    fp32 = ("fw", "s0", "z0", "o", "den", "mx", "do", "delta", "dq", "dfq", "sw", "r", "dk", "dfk", "dv")
    for fn, dtype, has_s0 in itertools.product((window._fwd, window._bwd_dq, window._bwd_dkv), ("fp32", "bf16"), (False, True)):
        if has_s0 and "HAS_S0" not in fn.arg_names:
            continue
        sig = {n: f"*{dtype}" for n in ("q", "k", "v", "fq", "fk")}
        sig |= {n: "*fp32" for n in fp32} | {"arg": "*i32"}
        sig |= {n: "i32" for n in ("T", "N", "P", "H", "G", "W", "BHT", "BHN")} | {"scale": "fp32", "eps": "fp32"}
        consts = {k: v for k, v in {**blocks, "HAS_S0": has_s0}.items() if k in fn.arg_names}
        sig |= {n: "constexpr" for n in consts}
        yield f"{fn.__name__} {dtype}{' state' if has_s0 else ''}", fn, sig, consts


@triton.jit
def _repro(x, y, N, W, BT: tl.constexpr):
    """The pattern Triton 3.4-3.7 miscompile: y[c0:c0+BT] = sum of the BT-blocks of x before hi(c0)."""
    r = tl.arange(0, BT)
    acc = tl.zeros([BT], dtype=tl.float32)
    lo = tl.program_id(0) * 0
    for c0 in range(0, N, BT):
        hi = (tl.maximum(c0 - W + 1, 0) // BT) * BT
        for kb in range(lo, hi, BT):
            acc += tl.load(x + kb + r, mask=kb + r < N, other=0.0)
        lo = hi
        tl.store(y + c0 + r, acc, mask=c0 + r < N)


def repro_miscompiled() -> bool:
    """Whether this Triton drops the carried lower bound of _repro's inner loop."""
    k = compile_kernel(_repro, {"x": "*fp32", "y": "*fp32", "N": "i32", "W": "i32", "BT": "constexpr"}, {"BT": 64})
    (_, _, carried), (inner_lb, _, _) = loops(k.asm["ttir"])[:2]
    assert carried == 1 and not inner_lb.startswith("%c"), k.asm["ttir"]  # TTIR: carried, as the Python says
    return loops(k.asm["ttgir"])[1][0].startswith("%c")  # TTGIR: a constant in its place


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if a window kernel carries a scalar through a loop")
    args = p.parse_args()
    print(f"triton {triton.__version__}, target sm_{TARGET.arch}")
    bad = []
    for name, fn, sig, consts in window_cases():
        k = compile_kernel(fn, sig, consts)
        ttir, ttgir = loops(k.asm["ttir"]), loops(k.asm["ttgir"])
        print(f"{name}: TTIR loops {ttir}; TTGIR loops {ttgir}")
        if any(carried for _, _, carried in ttir):
            bad.append(name)
    wrong = repro_miscompiled()
    print(f"repro: this Triton {'DROPS' if wrong else 'keeps'} a scalar carried into a nested loop's bound")
    if bad:
        print(f"window kernels that carry a scalar through a loop (Triton 3.4-3.7 miscompile it): {bad}")
        if args.check:
            sys.exit(1)


if __name__ == "__main__":
    main()
