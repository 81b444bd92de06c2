"""Where the window kernel goes wrong compiled on a GPU (docs/kernels.md, known limits).

    python scripts/diag_window_kernel.py        # a CUDA machine; about a minute
    TRITON_INTERPRET=1 python scripts/diag_window_kernel.py --quick   # the CPU, interpreted: the short shapes only

For each shape: the chunked reference against the quadratic oracle (fp64), then the Triton
kernel's forward against the reference per position: its max error, the first position over
1e-2 and how many are, and which (batch, head) pairs. The shapes vary one thing at a time from
the failing `test_gpu_long_sequences` case (GQA, head dims, warps, chunk, length, dtype).
"""

import sys
import time
sys.path[:0] = [str(__import__("pathlib").Path(__file__).resolve().parents[1] / p) for p in ("", "tests")]
import torch
from ops_testing import window_inputs
from linearize.ops.window import reference as ref, triton as tk
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

def case(b, h, hkv, t, dk, f, d, W, chunk=64, warps=8, cached=None, dtype=torch.float32):
    torch.manual_seed(0)
    x = window_inputs(b, h, hkv, t, dk, f, d, cached=cached)
    st = x.pop("initial_state", None)
    x = {n: v.to(dev) for n, v in x.items()}
    kw = dict(window=W, scale=dk ** -0.5)
    tk.NUM_WARPS = warps
    xk = {n: v.to(dtype) if n != "window_factor" else v.float() for n, v in x.items()}
    stk = None if st is None else type(st)(*(None if s is None else s.to(dev).float() for s in st))
    y = tk.window_attn_chunked(**xk, **kw, chunk_size=chunk, initial_state=stk).double()
    x64 = {n: v.to(dtype).double() if n != "window_factor" else v.double() for n, v in x.items()}
    st64 = None if st is None else type(st)(*(None if s is None else s.to(dev).double() for s in st))
    yc = ref.window_attn_chunked(**x64, **kw, chunk_size=chunk, initial_state=st64)
    msg = f"b{b} h{h}/{hkv} t{t} dk{dk} f{f} d{d} W{W} chunk{chunk} warps{warps} cache{cached} {str(dtype)[6:]}:"
    if st is None:
        yq = ref.window_attn_quadratic(**x64, **kw)
        msg += f" ref-vs-quad {(yc - yq).abs().max().item():.1e}"
    e = (y - yc).abs().amax(dim=(0, 1, 3))  # per position
    bad = (e > 1e-2).nonzero()
    msg += f" kernel-vs-ref max {e.max().item():.1e}; first bad t {bad[0].item() if len(bad) else None}; bad rows {len(bad)}"
    eh = (y - yc).abs().amax(dim=(2, 3))
    msg += f"; bad (b,h) {(eh > 1e-2).nonzero().tolist()[:8]}"
    print(msg, flush=True)

QUICK = sys.argv[1:] == ["--quick"]  # the shapes with t < 200 only (the CPU: interpreted, T=1000 is slow)
t0 = time.time()
for args in [dict(b=2, h=8, hkv=2, t=1000, dk=128, f=64, d=128, W=64),
             dict(b=2, h=8, hkv=8, t=1000, dk=128, f=64, d=128, W=64),
             dict(b=1, h=2, hkv=2, t=1000, dk=128, f=64, d=128, W=64),
             dict(b=1, h=2, hkv=2, t=1000, dk=64, f=64, d=64, W=64),
             dict(b=1, h=2, hkv=2, t=1000, dk=128, f=64, d=128, W=64, warps=4),
             dict(b=1, h=2, hkv=2, t=1000, dk=128, f=64, d=128, W=64, chunk=32),
             dict(b=1, h=2, hkv=2, t=1000, dk=128, f=64, d=128, W=64, chunk=16),
             dict(b=1, h=2, hkv=2, t=300, dk=128, f=64, d=128, W=64),
             dict(b=1, h=2, hkv=2, t=130, dk=128, f=64, d=128, W=64),
             dict(b=1, h=2, hkv=2, t=1000, dk=16, f=16, d=16, W=8),
             dict(b=1, h=4, hkv=2, t=45, dk=24, f=16, d=40, W=12, chunk=16, cached=7),
             dict(b=1, h=4, hkv=2, t=150, dk=24, f=16, d=40, W=20, chunk=16),  # state: block after block
             dict(b=1, h=2, hkv=2, t=1000, dk=128, f=64, d=128, W=64, dtype=torch.bfloat16)]:
    if QUICK and args["t"] >= 200:
        continue
    try:
        case(**args)
    except Exception as e:
        print(args, "ERROR", type(e).__name__, str(e)[:300], flush=True)
print(f"diag {time.time() - t0:.0f} s; triton {__import__('triton').__version__}")
