"""Monarch product ``y = x · Mᵀ`` with ``M = P·L·Pᵀ·R``: Triton kernels and a PyTorch reference.

Layout (shared by the kernels, the reference, :mod:`memopt.ops.monarch` and
:class:`memopt.nn.MonarchLinear`), for ``nblocks = b``::

    x  : (tokens, b*p)      input block k is x[:, k*p:(k+1)*p]
    w1 : (b, q, p)          R: b blocks of q x p, q = b*r
    w2 : (b, s, q)          L: b blocks of s x q
    h[m, k*q + j]  = sum_c w1[k, j, c] * x[m, k*p + c]                 (first block GEMM)
    y[m, l*s + j]  = sum_i w2[l, j, i] * h[m, (i // r)*q + l*r + i % r]  (second block GEMM)

The middle permutation Pᵀ sends rows ``l*r .. l*r+r-1`` of every R block ``k`` to L block
``l``: viewing ``h`` as ``(tokens, b_k, b_l, r)`` it is the transpose of the two block axes.
The Triton kernels never materialize it: they read (and, in the backward, write) ``h`` in its
natural layout through two-level strides ``(i // r) * q + i % r``.

The dense matrix is ``M[l*s + j, k*p + c] = sum_t w2[l, j, k*r + t] * w1[k, l*r + t, c]``:
block ``(l, k)`` of M (``s x p``) is a product of ``s x r`` and ``r x p`` factors, so the Monarch
class is exactly "every block of a b x b grid has rank <= r" and the Frobenius-optimal
projection of a dense matrix is a rank-r truncated SVD per block (:func:`project`). With
``b*b = n`` (the paper's square case) ``r = 1``: one rank-1 SVD per block pair.

Six grouped GEMMs make the forward and the backward; one Triton kernel serves all six
(:func:`_grouped_matmul`), with per-operand strides and the split addressing above.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = [
    "monarch_backward_reference",
    "monarch_backward_triton",
    "monarch_dense",
    "monarch_matmul_reference",
    "monarch_matmul_triton",
    "monarch_shapes",
    "project",
]


def monarch_shapes(x_features: int, w1: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int, int, int]:
    """``(nblocks, p, q, s, r)`` for factors ``w1 (b, q, p)`` and ``w2 (b, s, q)``; raises
    ``ValueError`` when the shapes do not make a Monarch product of ``x_features`` inputs."""
    if w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"monarch factors must be 3-D, got w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)}")
    nblocks, q, p = w1.shape
    if w2.shape[0] != nblocks or w2.shape[2] != q:
        raise ValueError(f"w2 must be (nblocks={nblocks}, s, q={q}), got {tuple(w2.shape)}")
    if q % nblocks:
        raise ValueError(f"the middle block size q={q} must be a multiple of nblocks={nblocks}")
    if x_features != nblocks * p:
        raise ValueError(f"x has {x_features} features, the factors need nblocks*p = {nblocks * p}")
    return nblocks, p, q, w2.shape[1], q // nblocks


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch reference: two batched matmuls and a transpose.
# ---------------------------------------------------------------------------------------------


def monarch_matmul_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``y = x · Mᵀ`` for the Monarch matrix of ``(w1, w2)``; ``x`` is ``(..., b*p)``."""
    nblocks, p, q, s, r = monarch_shapes(x.shape[-1], w1, w2)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, nblocks * p)
    tokens = x2.shape[0]
    # (b_k, tokens, p) @ (b_k, p, q): the strided view needs no copy of x for bmm.
    h = torch.bmm(x2.view(tokens, nblocks, p).transpose(0, 1), w1.transpose(1, 2))
    # The permutation: (b_k, tokens, b_l, r) -> (b_l, tokens, b_k, r).
    h = h.view(nblocks, tokens, nblocks, r).permute(2, 1, 0, 3).reshape(nblocks, tokens, q)
    y = torch.bmm(h, w2.transpose(1, 2))  # (b_l, tokens, s)
    del h  # free it before the final copy: peak 2 intermediates of the output's size, not 3
    return y.transpose(0, 1).reshape(*lead, nblocks * s)


def monarch_backward_reference(
    grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, dw1, dw2)`` of :func:`monarch_matmul_reference` for output grad ``grad``.

    The intermediate ``h`` is recomputed, so the forward needs to save only its inputs
    (like ``nn.Linear``), at the price of one extra block GEMM (+25% backward FLOPs)."""
    nblocks, p, q, s, r = monarch_shapes(x.shape[-1], w1, w2)
    x2 = x.reshape(-1, nblocks * p)
    tokens = x2.shape[0]
    xb = x2.view(tokens, nblocks, p).transpose(0, 1)  # (b_k, tokens, p)
    h = torch.bmm(xb, w1.transpose(1, 2))
    hp = h.view(nblocks, tokens, nblocks, r).permute(2, 1, 0, 3).reshape(nblocks, tokens, q)
    gb = grad.reshape(tokens, nblocks, s).transpose(0, 1)  # (b_l, tokens, s)
    dw2 = torch.bmm(gb.transpose(1, 2), hp)  # (b_l, s, q)
    dhp = torch.bmm(gb, w2)  # (b_l, tokens, q)
    dh = dhp.view(nblocks, tokens, nblocks, r).permute(2, 1, 0, 3).reshape(nblocks, tokens, q)
    dw1 = torch.bmm(dh.transpose(1, 2), xb)  # (b_k, q, p)
    dx = torch.bmm(dh, w1).transpose(0, 1).reshape(x.shape)  # (b_k, tokens, p) -> x's shape
    return dx, dw1, dw2


def monarch_dense(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The dense ``(b*s, b*p)`` matrix ``M`` of the factors."""
    nblocks, q, p = w1.shape
    s, r = w2.shape[1], q // nblocks
    left = w2.view(nblocks, s, nblocks, r)  # [l, j, k, t]
    right = w1.view(nblocks, nblocks, r, p)  # [k, l, t, c]
    return torch.einsum("ljkt,kltc->ljkc", left, right).reshape(nblocks * s, nblocks * p)


def project(
    weight: torch.Tensor, nblocks: int, block_rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The Frobenius-optimal Monarch approximation of a dense ``(out, in)`` ``weight``.

    Pads ``weight`` with zeros to ``(b*s, b*p)``, cuts it into a ``b x b`` grid of ``s x p``
    blocks and keeps the best rank-``block_rank`` approximation of each (Eckart-Young: a
    truncated SVD). The blocks use disjoint slices of ``w1`` and ``w2``, so blockwise optimal
    is globally optimal. Returns ``(w1, w2, relative_error)`` with the relative Frobenius
    error ``||W - M||/||W||`` of the real (unpadded) entries; the SVD runs in float64 for
    float64 weights and in float32 otherwise, and the factors come back in ``weight``'s dtype.
    """
    out_features, in_features = weight.shape
    p = -(-in_features // nblocks)
    s = -(-out_features // nblocks)
    r = block_rank
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dense = torch.zeros(nblocks * s, nblocks * p, dtype=compute, device=weight.device)
    dense[:out_features, :in_features] = weight.detach().to(compute)
    blocks = dense.view(nblocks, s, nblocks, p).permute(0, 2, 1, 3)  # [l, k, s, p]
    u, sigma, vh = torch.linalg.svd(blocks, full_matrices=False)
    keep = min(r, sigma.shape[-1])
    root = sigma[..., :keep].sqrt()
    left = u[..., :keep] * root.unsqueeze(-2)  # [l, k, s, keep]
    right = vh[..., :keep, :] * root.unsqueeze(-1)  # [l, k, keep, p]
    w2 = torch.zeros(nblocks, s, nblocks, r, dtype=compute, device=weight.device)
    w1 = torch.zeros(nblocks, nblocks, r, p, dtype=compute, device=weight.device)
    w2[..., :keep] = left.permute(0, 2, 1, 3)  # [l, s, k, t]
    w1[:, :, :keep] = right.transpose(0, 1)  # [k, l, t, p]
    w1 = w1.reshape(nblocks, nblocks * r, p)
    w2 = w2.reshape(nblocks, s, nblocks * r)
    approx = monarch_dense(w1, w2)[:out_features, :in_features]
    norm = dense.norm()
    error = float((approx - dense[:out_features, :in_features]).norm() / norm) if norm > 0 else 0.0
    return w1.to(weight.dtype), w2.to(weight.dtype), error


# ---------------------------------------------------------------------------------------------
# Triton: one grouped GEMM kernel with split (two-level) addressing, used six ways.
# ---------------------------------------------------------------------------------------------


# How the kernel addresses a dimension with split S, high stride hi and low stride lo (offset
# (i // S) * hi + (i % S) * lo), chosen per launch by a heuristic (the kernel's A_K_MODE,
# B_N_MODE, C_N_MODE). Without the first two, Triton 3.6 proves no 16-byte alignment through
# // and % (nor through a split of 1 << 30 with hi = 0) and loads those operands one element
# at a time (ld.global.b16, unpipelined) instead of with 16-byte cp.async:
_SPLIT_NONE = 0  # S >= the dimension: plain stride lo, no // or % at all
_SPLIT_TILED = 1  # S a multiple of the tile, hi of 16: one scalar offset a tile, hinted aligned
_SPLIT_GENERAL = 2  # anything else: per-element // and %, int64
# Offsets inside one tile (index < 256 times a stride) are int32 below this; int64 above.
_INT32_TILE_LIMIT = 2**31


def _split_mode(split: int, hi: int, size: int, block: int) -> int:
    if split >= size:
        return _SPLIT_NONE
    if split % block == 0 and block % 16 == 0 and hi % 16 == 0:
        return _SPLIT_TILED
    return _SPLIT_GENERAL


def _tile_offsets_fit_int32(args: dict[str, Any]) -> bool:
    strides = (args["a_sm"], args["a_sk_lo"], args["b_sk"], args["b_sn_lo"], args["c_sm"], args["c_sn_lo"])
    return 256 * max(abs(stride) for stride in strides) < _INT32_TILE_LIMIT


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """``(kernel, autotuned_kernel)``, built on first use so ``import memopt`` never imports
    Triton."""
    import triton
    import triton.language as tl

    @triton.heuristics(
        {
            "A_K_MODE": lambda args: _split_mode(args["a_ksplit"], args["a_sk_hi"], args["K"], args["BLOCK_K"]),
            "B_N_MODE": lambda args: _split_mode(args["b_nsplit"], args["b_sn_hi"], args["N"], args["BLOCK_N"]),
            "C_N_MODE": lambda args: _split_mode(args["c_nsplit"], args["c_sn_hi"], args["N"], args["BLOCK_N"]),
            "EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
            "TILE_I32": _tile_offsets_fit_int32,
        }
    )
    @triton.jit
    def grouped_matmul_kernel(
        a_ptr, b_ptr, c_ptr,
        M, N, K,
        a_sg, a_sm, a_ksplit, a_sk_hi, a_sk_lo,
        b_sg, b_sk, b_nsplit, b_sn_hi, b_sn_lo,
        c_sg, c_sm, c_nsplit, c_sn_hi, c_sn_lo,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        A_K_MODE: tl.constexpr, B_N_MODE: tl.constexpr, C_N_MODE: tl.constexpr,
        EVEN_K: tl.constexpr, TILE_I32: tl.constexpr,
    ):  # fmt: skip
        # C[g][m, n] = sum_k A[g][m, k] * B[g][k, n], g = program_id(2). A dimension marked
        # "split" with split S is addressed as (i // S) * hi + (i % S) * lo: that is how the
        # Monarch permutation is read and written without ever being materialized.
        # N tiles vary fastest: the programs running together share one A row tile (read from
        # HBM once, then L2) and sweep B, which is one small weight block per group (N is one
        # block, a few tiles wide, so a grouped/swizzled order would not cut HBM traffic).
        # Addresses: int64 scalar bases per program and per K step (uniform registers), plus
        # int32 offsets inside the tile where TILE_I32 says they fit.
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        group = tl.program_id(2).to(tl.int64)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        if not TILE_I32:
            offs_m = offs_m.to(tl.int64)
            offs_n = offs_n.to(tl.int64)
            offs_k = offs_k.to(tl.int64)
        row_mask = (m0 + offs_m) < M
        col_mask = (n0 + offs_n) < N
        a_tile = a_ptr + group * a_sg + m0.to(tl.int64) * a_sm + offs_m[:, None] * a_sm
        if A_K_MODE != 2:
            a_tile = a_tile + offs_k[None, :] * a_sk_lo
        b_tile = b_ptr + group * b_sg + offs_k[:, None] * b_sk
        if B_N_MODE == 0:
            b_tile = b_tile + n0.to(tl.int64) * b_sn_lo + offs_n[None, :] * b_sn_lo
        elif B_N_MODE == 1:
            b_col = (n0 // b_nsplit).to(tl.int64) * b_sn_hi + (n0 % b_nsplit).to(tl.int64) * b_sn_lo
            b_tile = b_tile + tl.multiple_of(b_col, 16) + offs_n[None, :] * b_sn_lo
        else:
            cols = (n0 + offs_n).to(tl.int64)
            b_tile = b_tile + ((cols // b_nsplit) * b_sn_hi + (cols % b_nsplit) * b_sn_lo)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if A_K_MODE == 0:
                a_ptrs = a_tile + tl.cast(k0, tl.int64) * a_sk_lo
            elif A_K_MODE == 1:
                # A multiple of 16 elements (a_sk_hi % 16 == 0, k0 % a_ksplit a multiple of
                # the tile), which Triton's axis analysis cannot see through // and %.
                a_k = (k0 // a_ksplit).to(tl.int64) * a_sk_hi + (k0 % a_ksplit).to(tl.int64) * a_sk_lo
                a_ptrs = a_tile + tl.multiple_of(a_k, 16)
            else:
                ks = (k0 + offs_k).to(tl.int64)
                a_ptrs = a_tile + ((ks // a_ksplit) * a_sk_hi + (ks % a_ksplit) * a_sk_lo)[None, :]
            b_ptrs = b_tile + tl.cast(k0, tl.int64) * b_sk
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_mask[None, :], other=0.0)
            else:
                k_mask = (k0 + offs_k) < K
                a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        c_tile = c_ptr + group * c_sg + m0.to(tl.int64) * c_sm + offs_m[:, None] * c_sm
        if C_N_MODE == 0:
            c_ptrs = c_tile + n0.to(tl.int64) * c_sn_lo + offs_n[None, :] * c_sn_lo
        elif C_N_MODE == 1:
            c_col = (n0 // c_nsplit).to(tl.int64) * c_sn_hi + (n0 % c_nsplit).to(tl.int64) * c_sn_lo
            c_ptrs = c_tile + tl.multiple_of(c_col, 16) + offs_n[None, :] * c_sn_lo
        else:
            cols = (n0 + offs_n).to(tl.int64)
            c_ptrs = c_tile + ((cols // c_nsplit) * c_sn_hi + (cols % c_nsplit) * c_sn_lo)[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])

    # Hopper-shaped: 128x256 / 256x128 tiles on two warpgroups (one m64n256 wgmma each, 128
    # accumulator registers a thread) with 3 stages (144 KiB of shared memory), 128x128 for
    # shapes with few tiles, 64x128 for the weight gradients (M = N = one block, few tiles).
    configs = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]
    # Keyed on the problem size and the two split values (they change the access pattern).
    autotuned = triton.autotune(configs, key=["M", "N", "K", "a_ksplit", "b_nsplit", "c_nsplit"])(
        grouped_matmul_kernel
    )
    return grouped_matmul_kernel, autotuned


def _input_precision(tensor: torch.Tensor) -> str:
    # Only float32 operands consult it: "tf32" (Triton's default) leaves 16-bit dots on the
    # tensor cores. float32 follows PyTorch's TF32 switch on GPU, as cuBLAS does; CPU tensors
    # mean Triton's interpreter (TRITON_INTERPRET=1), which computes in full precision.
    if tensor.dtype != torch.float32:
        return "tf32"
    return "tf32" if tensor.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


_NO_SPLIT = 1 << 30  # a split larger than any dimension: plain stride `lo`


def _grouped_matmul(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, groups: int, M: int, N: int, K: int,
    a_strides: tuple[int, int, int, int, int],
    b_strides: tuple[int, int, int, int, int],
    c_strides: tuple[int, int, int, int, int],
) -> None:  # fmt: skip
    """Launch ``C[g] = A[g] @ B[g]`` for ``g < groups``.

    ``a_strides = (group, m, k_split, k_hi, k_lo)``, ``b_strides = (group, k, n_split, n_hi,
    n_lo)``, ``c_strides = (group, m, n_split, n_hi, n_lo)``, in elements."""
    import triton

    kernel, autotuned = _kernels()
    if triton.cdiv(M, 64) > 65535:
        # M tiles sit on grid axis 1 (at most 65535 programs): ~4M rows at BLOCK_M >= 64.
        raise ValueError(f"monarch_matmul: {M} rows exceed the Triton launcher's grid limit")
    precision = _input_precision(a)
    if not a.is_cuda:
        # CPU tensors: Triton's interpreter (TRITON_INTERPRET=1), which runs every program in
        # Python; tiny fixed tiles keep it quick.
        grid = (triton.cdiv(N, 16), triton.cdiv(M, 16), groups)
        kernel[grid](
            a, b, c, M, N, K, *a_strides, *b_strides, *c_strides, precision, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16
        )
        return

    def grid(meta: dict[str, int]) -> tuple[int, int, int]:
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]), groups)

    autotuned[grid](a, b, c, M, N, K, *a_strides, *b_strides, *c_strides, precision)


def _first_factor(
    x2: torch.Tensor, w1: torch.Tensor, h: torch.Tensor, nblocks: int, tokens: int, q: int, p: int
) -> None:
    """``h[m, k*q + j] = sum_c x[m, k*p + c] * w1[k, j, c]``: the forward's first GEMM, which the
    backward repeats to rebuild ``h`` instead of saving it."""
    _grouped_matmul(
        x2, w1, h, nblocks, tokens, q, p,
        (p, x2.stride(0), _NO_SPLIT, 0, 1),
        (q * p, 1, _NO_SPLIT, 0, p),
        (q, nblocks * q, _NO_SPLIT, 0, 1),
    )  # fmt: skip


def monarch_matmul_triton(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Triton forward: two grouped GEMMs; the second reads ``h`` through the permutation."""
    nblocks, p, q, s, r = monarch_shapes(x.shape[-1], w1, w2)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, nblocks * p)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w1, w2 = w1.contiguous(), w2.contiguous()
    tokens = x2.shape[0]
    h = torch.empty(tokens, nblocks * q, dtype=x.dtype, device=x.device)
    y = torch.empty(tokens, nblocks * s, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return y.reshape(*lead, nblocks * s)
    _first_factor(x2, w1, h, nblocks, tokens, q, p)
    # y[m, l*s + j] = sum_i h[m, (i // r)*q + l*r + i % r] * w2[l, j, i]
    _grouped_matmul(
        h, w2, y, nblocks, tokens, s, q,
        (r, nblocks * q, r, q, 1),
        (s * q, 1, _NO_SPLIT, 0, q),
        (s, nblocks * s, _NO_SPLIT, 0, 1),
    )  # fmt: skip
    return y.reshape(*lead, nblocks * s)


def monarch_backward_triton(
    grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: recomputes ``h``, then four grouped GEMMs for ``dw2, dh, dw1, dx``."""
    nblocks, p, q, s, r = monarch_shapes(x.shape[-1], w1, w2)
    x2 = x.reshape(-1, nblocks * p)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    g2 = grad.reshape(-1, nblocks * s)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    w1, w2 = w1.contiguous(), w2.contiguous()
    tokens = x2.shape[0]
    dw1 = torch.empty_like(w1)
    dw2 = torch.empty_like(w2)
    dx = torch.empty(tokens, nblocks * p, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return dx.reshape(x.shape), dw1.zero_(), dw2.zero_()
    h = torch.empty(tokens, nblocks * q, dtype=x.dtype, device=x.device)
    _first_factor(x2, w1, h, nblocks, tokens, q, p)
    # dw2[l][j, i] = sum_m grad[m, l*s + j] * h[m, (i // r)*q + l*r + i % r]
    _grouped_matmul(
        g2, h, dw2, nblocks, s, q, tokens,
        (s, 1, _NO_SPLIT, 0, g2.stride(0)),
        (r, nblocks * q, r, q, 1),
        (s * q, q, _NO_SPLIT, 0, 1),
    )  # fmt: skip
    # dh[m, (i // r)*q + l*r + i % r] = sum_j grad[m, l*s + j] * w2[l, j, i]  (h's buffer reused)
    dh = h
    _grouped_matmul(
        g2, w2, dh, nblocks, tokens, q, s,
        (s, g2.stride(0), _NO_SPLIT, 0, 1),
        (s * q, q, _NO_SPLIT, 0, 1),
        (r, nblocks * q, r, q, 1),
    )  # fmt: skip
    # dw1[k][j, c] = sum_m dh[m, k*q + j] * x[m, k*p + c]
    _grouped_matmul(
        dh, x2, dw1, nblocks, q, p, tokens,
        (q, 1, _NO_SPLIT, 0, nblocks * q),
        (p, x2.stride(0), _NO_SPLIT, 0, 1),
        (q * p, p, _NO_SPLIT, 0, 1),
    )  # fmt: skip
    # dx[m, k*p + c] = sum_j dh[m, k*q + j] * w1[k, j, c]
    _grouped_matmul(
        dh, w1, dx, nblocks, tokens, p, q,
        (q, nblocks * q, _NO_SPLIT, 0, 1),
        (q * p, p, _NO_SPLIT, 0, 1),
        (p, nblocks * p, _NO_SPLIT, 0, 1),
    )  # fmt: skip
    return dx.reshape(x.shape), dw1, dw2
