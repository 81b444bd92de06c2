"""The attention math. Only this module chooses an implementation.

Layout everywhere: (B, H, T, D), k/v/gates may carry fewer (KV) heads (see ``common``). Each
attention kind has its package, ``ops/<kind>/``: its PyTorch reference forms (``reference.py``)
and its Triton kernels (``triton.py``; softmax has none, SDPA runs it).
The ``*_weights`` functions give attention weights (dense T x T), for losses on them.
``backend``: ``auto`` picks the Triton kernels for CUDA tensors when Triton
imports, and the PyTorch reference otherwise (saying why once on a GPU); ``reference`` forces
PyTorch; ``triton`` runs the kernels on CUDA, or on CPU in Triton's interpreter when
TRITON_INTERPRET=1 (how CI tests them), and anywhere else is an error, never a fallback.
Triton is imported on first use, so this module imports on machines without it.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from linearize.config import BACKENDS
from linearize.log import get_logger
from linearize.ops.common import expand_kv
from linearize.ops.delta import reference as _delta_reference
from linearize.ops.delta.reference import DeltaState
from linearize.ops.gated import reference as _gated_reference
from linearize.ops.gated.reference import GatedState
from linearize.ops.linear import reference as _linear_reference
from linearize.ops.linear.reference import LinearState, linear_attn_weights
from linearize.ops.softmax.reference import softmax_weights
from linearize.ops.window import reference as _window_reference
from linearize.ops.window.reference import WindowState, window_attn_weights

__all__ = [
    "BACKENDS", "BackendUnavailableError", "DeltaState", "GatedState", "LinearState", "WindowState", "delta_attn",
    "delta_attn_step", "gated_attn", "gated_attn_step", "linear_attn", "linear_attn_step", "linear_attn_weights", "resolve_backend", "softmax_attn",
    "softmax_weights", "window_attn", "window_attn_step", "window_attn_weights",
]  # fmt: skip

log = get_logger(__name__)
_said_why: set[str] = set()
_REFERENCE = {  # kinds with kernels
    "linear": _linear_reference, "window": _window_reference, "gated": _gated_reference, "delta": _delta_reference,
}  # fmt: skip


class BackendUnavailableError(NotImplementedError):
    """``attention.backend=triton`` where the Triton kernels cannot run."""


def _kernels(kind: str) -> ModuleType:
    return importlib.import_module(f"linearize.ops.{kind}.triton")


def _triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` here; None when they can."""
    if device.type not in ("cuda", "cpu"):
        return f"the tensors are on {device.type}; the Triton kernels run on CUDA (or CPU, interpreted)"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cpu" and not interpret:
        return (
            "the tensors are on the CPU and TRITON_INTERPRET is not 1 (Triton runs on the CPU only "
            "in its interpreter: set TRITON_INTERPRET=1 before the first use, for tests; it is slow)"
        )
    try:  # every kind's kernels at once: Triton builds them all compiled, or all interpreted
        for kind in _REFERENCE:
            _kernels(kind)
        interpreter_problem = importlib.import_module("linearize.ops.triton_common").interpreter_problem
    except ImportError as e:  # no triton (e.g. macOS), or a Triton too old for the kernels
        return f"Triton cannot be imported ({e}); install it with `pip install triton` (Linux)"
    return interpreter_problem() if device.type == "cpu" else None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The implementation that will run, ``reference`` or ``triton``.

    Raises BackendUnavailableError for ``triton`` where the kernels cannot run; ``auto`` then
    takes the reference and, on a GPU, logs once why.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return "reference"
    if backend == "auto" and device.type != "cuda":
        return "reference"
    why = _triton_unavailable(device)
    if why is None:
        return "triton"
    if backend == "triton":
        raise BackendUnavailableError(
            f"attention.backend=triton cannot run here: {why}. Use attention.backend=reference "
            "(or auto, which takes Triton on CUDA when it can)"
        )
    if why not in _said_why:
        _said_why.add(why)
        log.warning("attention.backend=auto runs the PyTorch reference on %s: %s", device, why)
    return "reference"


def _impl(kind: str, backend: str, device: torch.device) -> ModuleType:
    """The module whose forms of attention ``kind`` run: its kernels or its reference."""
    return _kernels(kind) if resolve_backend(backend, device) == "triton" else _REFERENCE[kind]


def _step_impl(kind: str, backend: str, device: torch.device, *xs) -> ModuleType:
    """As `_impl`, but ``auto`` keeps a step that needs a graph on the (differentiable)
    reference: the Triton steps are forward-only (decoding), ``triton`` there is an error."""
    wants_grad = torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in xs)
    return _REFERENCE[kind] if backend == "auto" and wants_grad else _impl(kind, backend, device)


def linear_attn(
    q: Tensor, k: Tensor, v: Tensor, *, normalize: bool = True, eps: float = 1e-6,
    chunk_size: int = 64, backend: str = "auto", initial_state: LinearState | None = None,
    output_final_state: bool = False,
) -> Tensor | tuple[Tensor, LinearState]:  # fmt: skip
    """Causal linear attention on feature-mapped q (B,H,T,F), k (B,H_kv,T,F); v (B,H_kv,T,D).

    With ``initial_state`` it continues a sequence; ``output_final_state`` also returns the state.
    """
    return _impl("linear", backend, q.device).linear_attn_chunked(
        q, k, v, chunk_size=chunk_size, normalize=normalize, eps=eps,
        initial_state=initial_state, output_final_state=output_final_state,
    )  # fmt: skip


def linear_attn_step(
    q: Tensor, k: Tensor, v: Tensor, state: LinearState | None, *, normalize: bool = True,
    eps: float = 1e-6, backend: str = "auto",
) -> tuple[Tensor, LinearState]:  # fmt: skip
    """One decoding step of ``linear_attn``: q (B,H,1,F), k (B,H_kv,1,F), v (B,H_kv,1,D)."""
    impl = _step_impl("linear", backend, q.device, q, k, v, *(state or ()))
    return impl.linear_attn_step(q, k, v, state, normalize=normalize, eps=eps)


# The window kernel's chunked forward, compiled for a GPU (H200, Triton 3.6.0, 2026-12-04:
# `make gpu-check`), is wrong past the first block on long sequences (max |diff| 0.54 against the
# fp64 reference, in fp32 too) while it matches the reference under Triton's interpreter. Until it
# is found and fixed, the dispatch never runs it on CUDA: a wrong attention is worse than a slow one.
# Its one-token step passed compiled and stays in use.
WINDOW_KERNEL_REFUSED = (
    "the window attention's Triton kernel was miscompiled on a GPU (Triton 3.4-3.7), and its rewrite "
    "that avoids the cause is not yet verified on one (docs/kernels.md, known limits)"
)


def _window_backend(backend: str, sinks: int, device: torch.device, *, step: bool = False) -> str:
    """The backend for a window op. Its Triton kernels have no sinks yet, and the chunked one is
    refused on CUDA (WINDOW_KERNEL_REFUSED): there ``auto`` takes the reference (said once) and
    ``triton`` is an error naming why and the fix."""
    if backend == "reference":
        return backend
    if sinks:
        why = f"has no kernel for attention.sinks={sinks} yet"
        fix = "attention.backend=auto or reference (the PyTorch forms), or attention.sinks=0"
        level, note = logging.INFO, f"attention.sinks={sinks}: the window attention runs the PyTorch reference (no Triton kernel yet)"  # fmt: skip
    elif device.type == "cuda" and not step:
        why = f"cannot run the window attention on CUDA: {WINDOW_KERNEL_REFUSED}"
        fix = "attention.backend=auto or reference (the PyTorch forms)"
        level, note = logging.WARNING, f"attention.backend=auto runs the window attention's PyTorch reference on {device}: {WINDOW_KERNEL_REFUSED}"  # fmt: skip
    else:
        return backend
    if backend == "triton":
        raise BackendUnavailableError(f"attention.backend=triton {why}: use {fix}")
    if note not in _said_why:
        _said_why.add(note)
        log.log(level, note)
    return "reference"


def window_attn(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, *, window: int,
    window_factor: Tensor, scale: float, eps: float = 1e-6, chunk_size: int = 64,
    backend: str = "auto", initial_state: WindowState | None = None, output_final_state: bool = False,
    sinks: int = 0,
) -> Tensor | tuple[Tensor, WindowState]:  # fmt: skip
    """LoLCATs hybrid: softmax over the last ``window`` keys and the first ``sinks``, linear over
    the others; see ``window.reference``."""
    backend = _window_backend(backend, sinks, q.device)
    return _impl("window", backend, q.device).window_attn_chunked(
        q, k, v, fq, fk, window=window, window_factor=window_factor, scale=scale,
        chunk_size=chunk_size, eps=eps, initial_state=initial_state,
        output_final_state=output_final_state, **({"sinks": sinks} if sinks else {}),
    )  # fmt: skip


def window_attn_step(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, state: WindowState | None, *,
    window: int, window_factor: Tensor, scale: float, eps: float = 1e-6, backend: str = "auto",
    sinks: int = 0,
) -> tuple[Tensor, WindowState]:  # fmt: skip
    """One decoding step of ``window_attn`` (one token in q, k, v, fq, fk)."""
    impl = _step_impl(
        "window", _window_backend(backend, sinks, q.device, step=True), q.device, q, k, v, fq, fk, window_factor, *(state or ())
    )
    return impl.window_attn_step(
        q, k, v, fq, fk, state, window=window, window_factor=window_factor, scale=scale, eps=eps,
        **({"sinks": sinks} if sinks else {}),
    )


def gated_attn(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float = 1.0, chunk_size: int = 64,
    backend: str = "auto", initial_state: GatedState | None = None, output_final_state: bool = False,
) -> Tensor | tuple[Tensor, GatedState]:  # fmt: skip
    """Gated linear attention (GLA): S_t = diag(exp g_t) S_{t-1} + k_tᵀ v_t, y_t = scale q_t S_t."""
    return _impl("gated", backend, q.device).gated_attn_chunked(
        q, k, v, g, scale=scale, chunk_size=chunk_size, initial_state=initial_state,
        output_final_state=output_final_state,
    )  # fmt: skip


def gated_attn_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: GatedState | None, *, scale: float = 1.0,
    backend: str = "auto",
) -> tuple[Tensor, GatedState]:  # fmt: skip
    """One decoding step of ``gated_attn`` (one token in q, k, v, g)."""
    impl = _step_impl("gated", backend, q.device, q, k, v, g, *(state or ()))
    return impl.gated_attn_step(q, k, v, g, state, scale=scale)


def delta_attn(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *, scale: float = 1.0,
    chunk_size: int = 64, backend: str = "auto", initial_state: DeltaState | None = None,
    output_final_state: bool = False,
) -> Tensor | tuple[Tensor, DeltaState]:  # fmt: skip
    """The delta rule (DeltaNet; Gated DeltaNet with per-head log decays g):
    S_t = α_t (I - β_t k_tᵀ k_t) S_{t-1} + β_t k_tᵀ v_t, y_t = scale q_t S_t; see ``delta.reference``."""
    return _impl("delta", backend, q.device).delta_attn_chunked(
        q, k, v, beta, g, scale=scale, chunk_size=chunk_size, initial_state=initial_state,
        output_final_state=output_final_state,
    )  # fmt: skip


def delta_attn_step(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, state: DeltaState | None, *,
    scale: float = 1.0, backend: str = "auto",
) -> tuple[Tensor, DeltaState]:  # fmt: skip
    """One decoding step of ``delta_attn`` (one token in q, k, v, beta, g)."""
    impl = _step_impl("delta", backend, q.device, q, k, v, beta, g, *(state or ()))
    return impl.delta_attn_step(q, k, v, beta, g, state, scale=scale)


def softmax_attn(q: Tensor, k: Tensor, v: Tensor, *, scale: float, window: int | None = None) -> Tensor:
    """Causal softmax attention as the teacher computes it (SDPA), optionally sliding-window.

    Args:
        q: (B, H, T, D); k, v: (B, H_kv, T_k, D) with T_k >= T: the last T keys are the queries'
            own positions, the T_k - T before them come earlier (a decoding window cache).
        window: keys per query, itself included; ``None`` for full causal attention.
    Returns:
        (B, H, T, D) in q's dtype.
    """
    h, t, t_k = q.shape[1], q.shape[2], k.shape[2]
    if t_k < t:
        raise ValueError(f"softmax_attn: {t_k} keys for {t} queries; keys must include the queries' positions")
    k, v = expand_kv(k, h), expand_kv(v, h)
    if t_k == t and (window is None or window >= t):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    dist = torch.arange(t, device=q.device)[:, None] + (t_k - t) - torch.arange(t_k, device=q.device)[None, :]
    allowed = (dist >= 0) if window is None else (dist >= 0) & (dist < window)  # (T, T_k)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
