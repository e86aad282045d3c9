"""A numpy model of the indexing of the CUDA caldera/lplr kernels (csrc/cuda/hadamard_gpu.cu,
csrc/cuda/caldera_gpu.cu), checked on the CPU against the format's definition of the transform
(pumice.format.kind_caldera.transform_matrix, float64).

The GPU cannot run here; these tests pin down the index arithmetic that the kernels use — the
butterfly pairing, the DCT mix, the sign bits, the tiles of the prefill kernels and the row map —
so that a layout mistake shows up on any machine. Each function mirrors one kernel line by line
(vectorised over threads where the kernel's threads are independent).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from pumice.format.kind_caldera import split_size, transform_matrix


# ---- the transform kernel (hadamard_kernel) ---------------------------------------------------

def kernel_dct(m: int) -> np.ndarray:
    """DeviceHadamard's host table: C_m in double, rounded to float32, row-major [m][m]."""
    c = np.empty((m, m), dtype=np.float32)
    for j in range(m):
        for i in range(m):
            c[j, i] = (1.0 / math.sqrt(m)) if j == 0 else \
                math.sqrt(2.0 / m) * math.cos(math.pi * (2 * i + 1) * j / (2 * m))
    return c.reshape(-1)


def sign_of(signs: np.ndarray, i: np.ndarray) -> np.ndarray:
    """(signs[i >> 3] >> (i & 7)) & 1 ? -1 : 1."""
    return np.where((signs[i >> 3] >> (i & 7)) & 1, -1.0, 1.0).astype(np.float32)


def butterfly_pairs(n: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, a + h) pairs of one stage (h = 2^sh): idx < n / 2,
    a = ((idx >> sh) << (sh + 1)) + (idx & (h - 1)), i.e. (idx / h)·2h + idx % h."""
    sh = h.bit_length() - 1
    idx = np.arange(n // 2, dtype=np.int64)
    a = ((idx >> sh) << (sh + 1)) + (idx & (h - 1))
    assert np.array_equal(a, (idx // h) * 2 * h + idx % h)
    return a, a + h


def kernel_transform(x: np.ndarray, signs: np.ndarray, inverse: bool) -> np.ndarray:
    """hadamard_kernel on one vector in float32: forward = T x, inverse = Tᵀ x."""
    n = x.shape[0]
    m, p = split_size(n)
    i = np.arange(n, dtype=np.int64)
    s = x.astype(np.float32).copy()
    if not inverse:
        s *= sign_of(signs, i)
    h = 1
    while h < p:
        a, b = butterfly_pairs(n, h)
        u, w = s[a].copy(), s[b].copy()
        s[a], s[b] = u + w, u - w
        h *= 2
    scale = np.float32(1.0 / math.sqrt(p))
    if m == 1:
        acc = s.copy()
    else:
        dct = kernel_dct(m)
        log2p = p.bit_length() - 1  # __ffs(p) - 1
        j, pp = i >> log2p, i & (p - 1)
        acc = np.zeros(n, dtype=np.float32)
        for q in range(m):
            c = dct[q * m + j] if inverse else dct[j * m + q]
            acc += c * s[(q << log2p) + pp]
    acc *= scale
    if inverse:
        acc *= sign_of(signs, i)
    return acc


SIZES = [1, 2, 8, 9, 37, 40, 64, 72, 96, 160, 344, 576, 1536, 11008]


@pytest.mark.parametrize("n", SIZES)
def test_butterfly_stages_touch_each_element_once_and_stay_in_their_block(n):
    m, p = split_size(n)
    h = 1
    while h < p:
        a, b = butterfly_pairs(n, h)
        both = np.concatenate([a, b])
        assert both.min() >= 0 and both.max() < n
        assert np.array_equal(np.sort(both), np.arange(n)), "a stage must be a perfect matching"
        assert np.array_equal(a // p, b // p), "a pair crosses a block of P"
        h *= 2


@pytest.mark.parametrize("n", SIZES)
def test_kernel_transform_matches_the_format_definition(n):
    rng = np.random.default_rng(n)
    signs = rng.integers(0, 256, size=(n + 7) // 8, dtype=np.uint8)
    if n % 8:  # padding bits are zero in files
        signs[-1] &= (1 << (n % 8)) - 1
    t = transform_matrix(signs, n)
    x = rng.standard_normal(n)
    fwd = kernel_transform(x, signs, inverse=False)
    inv = kernel_transform(x, signs, inverse=True)
    scale = np.abs(x).max() * math.sqrt(n)
    assert np.abs(fwd - t @ x).max() < 2e-6 * scale
    assert np.abs(inv - t.T @ x).max() < 2e-6 * scale
    assert np.abs(kernel_transform(fwd, signs, inverse=True) - x).max() < 4e-6 * scale


# ---- the split transform (hadamard_split_kernel, decode) --------------------------------------

SPLIT_THREADS = 256


def split_shape(n: int) -> tuple[int, int, int, int]:
    """split_shape(): P2 = min(P, 256), P1 = P / P2, R = m · P1; returns (p2, log2p2, log2p1, rows)."""
    m, p = split_size(n)
    p2 = min(p, SPLIT_THREADS)
    log2p2 = p2.bit_length() - 1
    p1 = p // p2
    log2p1 = p1.bit_length() - 1
    return p2, log2p2, log2p1, m * p1


def split_rows_per_block(rows: int, n_vec: int, num_sms: int) -> int:
    """launch_split(): the fewest rows per block (1, 2, 4, 8) with about two blocks per SM."""
    rb = 1
    while rb < 8 and -(-rows // rb) * n_vec > 2 * num_sms:
        rb *= 2
    return rb


def kernel_split_transform(x: np.ndarray, signs: np.ndarray, inverse: bool, rb: int,
                           touched: np.ndarray | None = None) -> np.ndarray:
    """hadamard_split_kernel on one vector in float32, block by block and thread by thread
    (threads vectorised): forward = T x, inverse = Tᵀ x. `touched` counts stores per index."""
    n = x.shape[0]
    m, _ = split_size(n)
    p2, lp2, lp1, rows = split_shape(n)
    groups = SPLIT_THREADS >> lp2
    tid = np.arange(SPLIT_THREADS)
    c, g = tid & (p2 - 1), tid >> lp2
    dct = kernel_dct(m) if m > 1 else None
    scale = np.float32(1.0 / math.sqrt(p2 << lp1))
    out = np.full(n, np.nan, dtype=np.float32)
    n_blocks = -(-rows // rb)
    for block in range(n_blocks):
        o0 = block * rb
        o = np.minimum(o0 + np.arange(rb), rows - 1)
        jo, o1 = o >> lp1, o & ((1 << lp1) - 1)
        acc = np.zeros((rb, SPLIT_THREADS), dtype=np.float32)
        for it in range(-(-rows // groups)):
            r = g + it * groups
            live = r < rows
            rl = np.where(live, r, 0)  # threads past the last row do not run the loop body
            q, pr = rl >> lp1, rl & ((1 << lp1) - 1)
            i = (r << lp2) + c
            assert np.all(i[live] < n)
            xv = np.where(live, x.astype(np.float32)[np.where(live, i, 0)], 0).astype(np.float32)
            if not inverse:
                xv *= sign_of(signs, np.where(live, i, 0))
            for k in range(rb):
                if m == 1:
                    coef = np.ones(SPLIT_THREADS, dtype=np.float32)
                else:
                    coef = dct[q * m + jo[k]] if inverse else dct[jo[k] * m + q]
                    coef = np.where(live, coef, 0).astype(np.float32)
                par = np.zeros(SPLIT_THREADS, dtype=np.int64)
                bits = o1[k] & pr
                while np.any(bits):
                    par ^= bits & 1
                    bits = bits >> 1
                coef = np.where(par == 1, -coef, coef)
                acc[k] += np.where(live, coef * xv, 0).astype(np.float32)
        red = np.zeros(SPLIT_THREADS * rb, dtype=np.float32)
        for k in range(rb):
            idx = (g * rb + k) * p2 + c
            assert len(np.unique(idx)) == SPLIT_THREADS and idx.max() < red.size
            red[idx] = acc[k]
        e = np.arange(rb * p2)
        k_e, c_e = e >> lp2, e & (p2 - 1)
        sums = red[e].copy()
        for gg in range(1, groups):
            src = (gg * rb + k_e) * p2 + c_e
            assert np.all(src >= rb * p2), "a partial read after its slot was overwritten"
            sums += red[src]
        red[e] = sums
        for sh in range(lp2):
            h = 1 << sh
            idx = np.arange(rb * p2 // 2)
            a = ((idx >> sh) << (sh + 1)) + (idx & (h - 1))
            assert np.array_equal(a // p2, (a + h) // p2), "a pair crosses a row"
            u, w = red[a].copy(), red[a + h].copy()
            red[a], red[a + h] = u + w, u - w
        o_e = o0 + k_e
        ok = o_e < rows
        i = (o_e[ok] << lp2) + c_e[ok]
        y = red[e[ok]] * scale
        if inverse:
            y *= sign_of(signs, i)
        out[i] = y
        if touched is not None:
            np.add.at(touched, i, 1)
    return out


SPLIT_SIZES = [1, 2, 8, 9, 37, 40, 64, 72, 96, 160, 344, 576, 1536, 2048, 4096, 11008, 14336]


@pytest.mark.parametrize("n", SPLIT_SIZES)
def test_split_shape_factors_the_size(n):
    m, p = split_size(n)
    p2, lp2, lp1, rows = split_shape(n)
    assert p2 == 1 << lp2 and p2 <= SPLIT_THREADS and SPLIT_THREADS % p2 == 0
    assert (p2 << lp1) == p and rows * p2 == n
    # H_P = H_P1 ⊗ H_P2 under p = p1 · P2 + c: the kernel's sign (−1)^popcount(o1 & p1) times the
    # P2-point butterflies equals the Sylvester matrix of size P.
    if p <= 1024:
        hp = np.array([[(-1) ** bin(a & b).count("1") for b in range(p)] for a in range(p)])
        p1 = 1 << lp1
        h1 = hp[:p1, :p1]
        h2 = hp[:p2, :p2]
        assert np.array_equal(np.kron(h1, h2), hp)


@pytest.mark.parametrize("n", SPLIT_SIZES)
@pytest.mark.parametrize("rb", [1, 2, 4, 8])
def test_split_kernel_matches_the_format_definition(n, rb):
    if (n >= 4096 and rb in (2, 4)) or (n > 4096 and rb == 1):
        pytest.skip("the large sizes run with the rows per block their launches use (time)")
    rng = np.random.default_rng(n + rb)
    signs = rng.integers(0, 256, size=(n + 7) // 8, dtype=np.uint8)
    if n % 8:
        signs[-1] &= (1 << (n % 8)) - 1
    x = rng.standard_normal(n)
    touched = np.zeros(n, dtype=np.int64)
    fwd = kernel_split_transform(x, signs, False, rb, touched)
    assert np.all(touched == 1), "every output element stored exactly once"
    inv = kernel_split_transform(x, signs, True, rb)
    scale = np.abs(x).max() * math.sqrt(n)
    if n <= 4096:
        t = transform_matrix(signs, n)
        assert np.abs(fwd - t @ x).max() < 2e-6 * scale
        assert np.abs(inv - t.T @ x).max() < 2e-6 * scale
    else:  # against the (already verified) one-block kernel model
        assert np.abs(fwd - kernel_transform(x, signs, False)).max() < 2e-6 * scale
        assert np.abs(inv - kernel_transform(x, signs, True)).max() < 2e-6 * scale
    assert np.abs(kernel_split_transform(fwd, signs, True, rb) - x).max() < 4e-6 * scale


def test_split_rows_per_block_choice():
    assert split_rows_per_block(16, 1, 132) == 1       # 4096 at batch 1
    assert split_rows_per_block(125, 1, 132) == 1      # 32000 at batch 1: 125 blocks
    assert split_rows_per_block(125, 16, 132) == 8     # 32000 at batch 16
    assert split_rows_per_block(43, 16, 132) == 4      # 11008 at batch 16: 11 × 16 blocks


def test_dct_table_matches_reference():
    from pumice.format.kind_caldera import dct_matrix
    for m in (3, 9, 43, 135):
        assert np.abs(kernel_dct(m).reshape(m, m) - dct_matrix(m)).max() < 1e-7


# ---- the row map (RowMap in device_linear.cuh, stored_row in tiled_weight.cuh) ---------------

def stored_row(src: int, perm_d: int) -> int:
    if perm_d == 0:
        return src
    head, d, half = src // perm_d, src % perm_d, perm_d // 2
    dd = d if d < half else d - half
    return head * perm_d + 16 * (dd // 8) + (0 if d < half else 8) + dd % 8


def row_map(r: int, tile_base: int, tile_stride: int, perm_d: int) -> int:
    s = stored_row(r, perm_d)
    return (tile_base + (s // 16) * tile_stride) * 16 + s % 16


@pytest.mark.parametrize("n,perm_d,base,stride", [(256, 64, 0, 1), (128, 64, 16, 1), (344, 0, 1, 2),
                                                  (128, 128, 0, 1), (40, 0, 0, 1)])
def test_row_map_is_injective(n, perm_d, base, stride):
    rows = [row_map(r, base, stride, perm_d) for r in range(n)]
    assert len(set(rows)) == n and min(rows) >= 16 * base


# ---- the prefill kernels (combine, transpose, write_rows_f16) --------------------------------

def combine_coverage(N: int, K: int) -> np.ndarray:
    """How often combine_kernel writes each (n, k): grid (ceil(K/128), ceil(N/32)), 256 threads,
    thread (tx = t % 32, ty = t / 32) owns rows n0 + ty + 8a and columns k0 + tx + 32c."""
    count = np.zeros((N, K), dtype=np.int64)
    t = np.arange(256)
    tx, ty = t % 32, t // 32
    for bx in range(-(-K // 128)):
        for by in range(-(-N // 32)):
            for a in range(4):
                for c in range(4):
                    n = by * 32 + ty + 8 * a
                    k = bx * 128 + tx + 32 * c
                    ok = (n < N) & (k < K)
                    np.add.at(count, (n[ok], k[ok]), 1)
    return count


def tile32_coverage(rows: int, cols: int, bound_cols: int) -> np.ndarray:
    """transpose_kernel / write_rows_f16_kernel: block (32, 8) over a 32×32 tile, threadIdx.y
    striding by 8; each (r, c) with r < rows, c < bound_cols is written once."""
    count = np.zeros((rows, bound_cols), dtype=np.int64)
    x = np.arange(32)[:, None]
    y = np.arange(8)[None, :]
    for bx in range(-(-cols // 32)):
        for by in range(-(-rows // 32)):
            for i0 in range(0, 32, 8):
                i = (i0 + y) + 0 * x  # the loop variable i = threadIdx.y + 8·step
                r = by * 32 + i
                c = bx * 32 + x + 0 * y
                ok = (r < rows) & (c < bound_cols)
                np.add.at(count, (r[ok], c[ok]), 1)
    return count


@pytest.mark.parametrize("N,K", [(96, 160), (40, 72), (344, 256), (37, 300), (256, 129)])
def test_prefill_kernels_write_every_element_once(N, K):
    assert (combine_coverage(N, K) == 1).all()
    # transpose: in [rows=N][cols=K] -> out[c][r]; write_rows: grid over ldo columns
    assert (tile32_coverage(N, K, K) == 1).all()
    ldo = -(-K // 128) * 128
    assert (tile32_coverage(N, ldo, ldo) == 1).all()


def test_prefill_pipeline_model_matches_reconstruction():
    """dequantize_f16's data flow in numpy: M = Q + L R; rows get T_inᵀ; transpose; rows of Mᵀ
    get T_outᵀ; transpose back to rows at map(r), zero beyond K."""
    rng = np.random.default_rng(3)
    N, K, rank = 96, 160, 12
    s_in = rng.integers(0, 256, (K + 7) // 8, dtype=np.uint8)
    s_out = rng.integers(0, 256, (N + 7) // 8, dtype=np.uint8)
    q = rng.standard_normal((N, K))
    l, r = rng.standard_normal((N, rank)), rng.standard_normal((rank, K))
    m = (q + l @ r).astype(np.float32)
    m = np.stack([kernel_transform(row, s_in, inverse=True) for row in m])
    mt = m.T.copy()
    mt = np.stack([kernel_transform(row, s_out, inverse=True) for row in mt])
    ldo, base, stride, perm_d = 256, 2, 1, 32
    out = np.full((16 * (base + N // 16 + 1), ldo), np.nan, dtype=np.float32)
    for n in range(N):
        out[row_map(n, base, stride, perm_d), :K] = mt[:, n]
        out[row_map(n, base, stride, perm_d), K:] = 0.0
    ref = transform_matrix(s_out, N).T @ (q + l @ r) @ transform_matrix(s_in, K)
    got = np.stack([out[row_map(n, base, stride, perm_d)] for n in range(N)])
    assert np.abs(got[:, :K] - ref).max() < 1e-5 * np.abs(ref).max()
    assert (got[:, K:] == 0).all()


# ---- the test data of tests/test_cuda_caldera.py, checked here on the CPU ----------------------

@pytest.mark.parametrize("n", [1, 9, 40, 96, 300, 344, 576])
def test_fast_transform_reference_matches_explicit_matrix(n):
    from caldera_tensors import fast_transform, random_signs
    rng = np.random.default_rng(n)
    signs = random_signs(rng, n)
    t = transform_matrix(signs, n)
    x = rng.standard_normal((3, n))
    assert np.abs(fast_transform(x, signs) - x @ t.T).max() < 1e-12 * n
    assert np.abs(fast_transform(x, signs, inverse=True) - x @ t).max() < 1e-12 * n


@pytest.fixture(scope="module")
def kernel_cases_file(tmp_path_factory):
    from caldera_tensors import KERNEL_CASES, write_tensors
    path = tmp_path_factory.mktemp("caldera_cases") / "cases.pumice"
    return path, write_tensors(path, KERNEL_CASES, seed=7)


def test_factored_reference_matches_the_reader(kernel_cases_file):
    from caldera_tensors import factored_apply
    from pumice.format.reader import PumiceFile
    path, factors = kernel_cases_file
    rng = np.random.default_rng(0)
    with PumiceFile(path) as f:
        for name, fac in factors.items():
            w = f.dequantize(name).astype(np.float64)
            x = rng.standard_normal((4, w.shape[1]))
            ref = x @ w.T
            assert np.abs(factored_apply(fac, x) - ref).max() < 1e-5 * np.abs(ref).max(), name


def test_cpu_backend_matches_factored_reference(kernel_cases_file, monkeypatch, native_model_class):
    from caldera_tensors import factored_apply
    from tiny_model import relative_error
    NativeModel = native_model_class
    monkeypatch.setenv("PUMICE_RTN_ACTIVATIONS", "f32")  # the CPU kernels' exact paths
    monkeypatch.setenv("PUMICE_BCQ_LUT", "exact4")
    path, factors = kernel_cases_file
    rng = np.random.default_rng(1)
    with NativeModel(path) as model:
        for name, fac in factors.items():
            k = model.tensor_shape(name)[1]
            x = rng.standard_normal((5, k)).astype(np.float32)
            assert relative_error(model.linear_apply(name, x), factored_apply(fac, x)) < 1e-5, name


def test_caldera_llama_runs_on_the_cpu_backend(tmp_path, monkeypatch, native_model_class):
    from caldera_tensors import file_weights, write_caldera_llama
    from tiny_model import reference_logits, relative_error
    NativeModel = native_model_class
    monkeypatch.setenv("PUMICE_RTN_ACTIVATIONS", "f32")
    monkeypatch.setenv("PUMICE_BCQ_LUT", "exact4")
    path = tmp_path / "llama.pumice"
    config = write_caldera_llama(path, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=64, intermediate_size=344, vocab_size=500)
    tokens = list(range(3, 25))
    ref = reference_logits(file_weights(path), config, tokens)
    with NativeModel(path) as model:
        s = model.new_session(64)
        assert relative_error(s.forward(tokens, logits_all=True), ref) < 1e-4
