"""CPU kernels (csrc/src/kind_dense.cpp, kind_rtn.cpp, cpu_gemm.cpp, threadpool.cpp) against
float64 references on fresh random inputs.

Tolerances, per output element y[b, n] (y64 is the float64 product with the stored matrix,
i.e. the dequantized weights computed exactly in float64):
  * f32 accumulation (dense GEMV/GEMM, rtn GEMM, rtn GEMV in exact mode):
        |y - y64| <= 1e-5 * sum_k |W[n, k] x[b, k]|
  * rtn GEMV with int8 activations (the default for batches of 1 to 8 tokens at 2/4 bits, 1 to
    4 at 3/8 bits): x is rounded to int8 per block of 32 with step d = max|x_block| / 127, so
    each x_k moves by at most d/2:
        |y - y64| <= 0.5 * (1 + 1e-4) * sum_k |scale[n, k/g] code[n, k]| * d_block(k)
                     + 1e-5 * sum_k |W[n, k] x[b, k]|
    (the mins are applied through exact f32 group sums of x, so they add no int8 error).
  * dequantize: exact. scale (f16) * code (<= 8 bits) is exact in f32, so the only rounding is
    the final addition of the min, as in float64 → float32.

The rtn packing is written here bit by bit from the FORMAT.md definition, independently of
pumice.format.packing (which is checked against it once).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from pumice.format.packing import pack_codes
from pumice.format.writer import PumiceWriter, float32_to_bf16_bits
from pumice.runtime.native import NativeModel, PumiceFormatError, UnsupportedError

BATCHES = (1, 3, 8, 17, 64)
F32_RTOL = 1e-5


# ---- independent references ----------------------------------------------------------------

def pack_bits_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """FORMAT.md: code j of a row is bits [j*b, j*b+b) of the row, bit i of the stream being bit
    i mod 8 of byte i // 8; rows are zero padded to a multiple of 32 codes."""
    n, k = codes.shape
    kp = -(-k // 32) * 32
    padded = np.zeros((n, kp), np.int64)
    padded[:, :k] = codes
    stream = ((padded[:, :, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(n, kp * bits)
    return np.packbits(stream, axis=1, bitorder="little")


def f16_to_f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float16).astype(np.float64)


def bf16_bits_to_f64(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


class RtnCase:
    def __init__(self, rng, n, k, bits, group_size):
        self.n, self.k, self.bits, self.group_size = n, k, bits, group_size
        self.groups = -(-k // group_size)
        self.codes = rng.integers(0, 1 << bits, size=(n, k))
        # Realistic magnitudes: scale ~ range / levels, min ~ -range / 2.
        spread = rng.uniform(0.02, 0.2, size=(n, self.groups))
        self.scales = (spread / ((1 << bits) - 1)).astype(np.float16)
        self.mins = (-spread / 2 + rng.normal(0, 0.01, size=(n, self.groups))).astype(np.float16)
        col_group = np.arange(k) // group_size
        self.scale_per_k = f16_to_f64(self.scales)[:, col_group]
        self.w64 = self.scale_per_k * self.codes + f16_to_f64(self.mins)[:, col_group]

    def parts(self):
        return {"codes": pack_bits_reference(self.codes, self.bits),
                "scales": self.scales, "mins": self.mins}


# ---- the test file ---------------------------------------------------------------------------

# (N, K) pairs: odd N, K not a multiple of 8 / 32 / the group size, ragged last groups.
DENSE_SHAPES = [(37, 45), (96, 256), (129, 1000), (8, 8), (1, 33)]
RTN_SHAPES = [  # (N, K, group_size)
    (33, 32, 32), (65, 100, 64), (31, 200, 128), (128, 256, 96), (17, 520, 256),
    (50, 1000, 32), (7, 33, 64), (96, 4200, 4096),
]
RTN_BITS = (2, 3, 4, 8)


@pytest.fixture(scope="module")
def kernel_file(tmp_path_factory):
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    path = tmp_path_factory.mktemp("kernels") / "kernels.pumice"
    dense, rtn = {}, {}
    with PumiceWriter(path, {"architecture": "tensors"}) as writer:
        for dtype in ("f32", "f16", "bf16"):
            for n, k in DENSE_SHAPES:
                name = f"dense.{dtype}.{n}x{k}"
                w = rng.standard_normal((n, k)).astype(np.float32)
                if dtype == "f32":
                    part, w64 = w, w.astype(np.float64)
                elif dtype == "f16":
                    part = w.astype(np.float16)
                    w64 = f16_to_f64(part)
                else:
                    bits = float32_to_bf16_bits(w)
                    part, w64 = ("bf16", bits), bf16_bits_to_f64(bits)
                writer.add_tensor(name, "dense", [n, k], {}, {"weight": part})
                dense[name] = w64
        for bits in RTN_BITS:
            for n, k, g in RTN_SHAPES:
                name = f"rtn.b{bits}.{n}x{k}.g{g}"
                case = RtnCase(rng, n, k, bits, g)
                writer.add_tensor(name, "rtn", [n, k], {"bits": bits, "group_size": g}, case.parts())
                rtn[name] = case
    return path, dense, rtn, rng


@pytest.fixture(scope="module")
def models(kernel_file):
    """The file opened twice: default (int8 activations) and exact mode; 2 threads each."""
    path = kernel_file[0]
    old = os.environ.get("PUMICE_RTN_ACTIVATIONS")
    try:
        os.environ["PUMICE_RTN_ACTIVATIONS"] = "int8"
        default = NativeModel(path, n_threads=2)
        os.environ["PUMICE_RTN_ACTIVATIONS"] = "f32"
        exact = NativeModel(path, n_threads=2)
    finally:
        if old is None:
            os.environ.pop("PUMICE_RTN_ACTIVATIONS", None)
        else:
            os.environ["PUMICE_RTN_ACTIVATIONS"] = old
    yield default, exact
    default.close()
    exact.close()


def random_x(rng, batch, k):
    # Activations with outliers, like real hidden states.
    x = rng.standard_normal((batch, k))
    x[rng.random((batch, k)) < 0.01] *= 20
    return x.astype(np.float32)


def assert_f32_close(y, x, w64, what):
    x64 = x.astype(np.float64)
    y64 = x64 @ w64.T
    bound = F32_RTOL * (np.abs(x64) @ np.abs(w64).T) + 1e-30
    err = np.abs(y.astype(np.float64) - y64)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), (f"{what}: error {err[worst]:.3g} > bound {bound[worst]:.3g} "
                                  f"at {worst} (y64 {y64[worst]:.6g})")


# ---- packing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", RTN_BITS)
def test_format_packer_matches_bitwise_definition(bits):
    rng = np.random.default_rng()
    for k in (1, 31, 32, 33, 100, 256):
        codes = rng.integers(0, 1 << bits, size=(5, k))
        np.testing.assert_array_equal(pack_codes(codes, bits), pack_bits_reference(codes, bits))


# ---- dense ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("batch", BATCHES)
def test_dense_apply(models, kernel_file, dtype, batch):
    _, dense, _, rng = kernel_file
    model = models[0]
    for name, w64 in dense.items():
        if f".{dtype}." not in name:
            continue
        x = random_x(rng, batch, w64.shape[1])
        assert_f32_close(model.linear_apply(name, x), x, w64, name)


# ---- rtn -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", RTN_BITS)
def test_rtn_dequantize_is_exact(models, kernel_file, bits):
    _, _, rtn, _ = kernel_file
    for name, case in rtn.items():
        if case.bits != bits:
            continue
        got = models[0].dequantize(name)
        np.testing.assert_array_equal(got, case.w64.astype(np.float32), err_msg=name)


@pytest.mark.parametrize("bits", RTN_BITS)
@pytest.mark.parametrize("batch", BATCHES)
def test_rtn_apply_exact_f32(models, kernel_file, bits, batch):
    _, _, rtn, rng = kernel_file
    for name, case in rtn.items():
        if case.bits != bits:
            continue
        x = random_x(rng, batch, case.k)
        assert_f32_close(models[1].linear_apply(name, x), x, case.w64, name + " (exact mode)")
        if batch > per_token_limit(bits):  # larger batches (prefill) are exact in every mode
            assert_f32_close(models[0].linear_apply(name, x), x, case.w64, name)


def per_token_limit(bits: int) -> int:
    """Largest batch that runs the batch-1 (int8 by default) kernel per token (kind_rtn.cpp)."""
    return 8 if bits in (2, 4) else 4


def int8_steps(case: RtnCase, x: np.ndarray) -> np.ndarray:
    """[batch, k]: the int8 step (block absmax / 127) that each input is rounded to."""
    kp = -(-case.k // 32) * 32
    xp = np.zeros((x.shape[0], kp))
    xp[:, :case.k] = np.abs(x)
    step = xp.reshape(x.shape[0], kp // 32, 32).max(axis=2) / 127.0  # [batch, blocks]
    return np.repeat(step, 32, axis=1)[:, :case.k]


def int8_error_weights(case: RtnCase) -> np.ndarray:
    """What each input's int8 rounding error is multiplied by: s·(c - L/2). The mins and the
    codes' mid-range L/2 go through exact input sums (kind_rtn.cpp, centring_corrections)."""
    return case.scale_per_k * (case.codes - ((1 << case.bits) - 1) / 2.0)


def int8_activation_bound(case: RtnCase, x: np.ndarray) -> np.ndarray:
    """Worst case: every input off by half a step, all errors aligned with its weight."""
    return 0.5 * (1 + 1e-4) * (int8_steps(case, x) @ np.abs(int8_error_weights(case)).T)


def int8_activation_rms(case: RtnCase, x: np.ndarray) -> float:
    """Expected norm of the int8 error over all outputs: rounding errors uniform in half a step
    and independent."""
    variance = (int8_steps(case, x) ** 2 / 12.0) @ (int8_error_weights(case) ** 2).T
    return float(np.sqrt(variance.sum()))


@pytest.mark.parametrize("bits", RTN_BITS)
def test_rtn_gemv_int8_activations(models, kernel_file, bits):
    _, _, rtn, rng = kernel_file
    for name, case in rtn.items():
        if case.bits != bits:
            continue
        # Small batches (decode_batch) run the same kernel once per token.
        for outliers, batch in ((False, 1), (True, 1), (False, 3), (True, per_token_limit(bits))):
            x = (random_x(rng, batch, case.k) if outliers
                 else rng.standard_normal((batch, case.k)).astype(np.float32))
            y = models[0].linear_apply(name, x).astype(np.float64)
            x64 = x.astype(np.float64)
            y64 = x64 @ case.w64.T
            bound = int8_activation_bound(case, x64) + F32_RTOL * (np.abs(x64) @ np.abs(case.w64).T)
            err = np.abs(y - y64)
            assert np.all(err <= bound), f"{name}: max error/bound {np.max(err / bound):.3g}"
            # The worst-case bound is loose enough to hide a broken kernel; the typical error is
            # not: in norm it is about its expected size (measured 0.9-1.0x on average and 2.2x at
            # most over 60 draws per matrix; the outputs of one token share its roundings, so a
            # 7-row matrix has a heavy tail). 6x keeps a fresh seed from failing.
            assert np.linalg.norm(y - y64) <= 6 * int8_activation_rms(case, x64) + 1e-6 * np.linalg.norm(y64), name


def test_results_do_not_depend_on_thread_count(kernel_file):
    path, dense, rtn, rng = kernel_file
    with NativeModel(path, n_threads=1) as one, NativeModel(path, n_threads=2) as two:
        for name, k in [("dense.f16.129x1000", 1000), ("rtn.b3.50x1000.g32", 1000),
                        ("rtn.b4.96x4200.g4096", 4200)]:
            for batch in (1, 17):
                x = random_x(rng, batch, k)
                np.testing.assert_array_equal(one.linear_apply(name, x), two.linear_apply(name, x))


# ---- bad input -------------------------------------------------------------------------------

def _write_single(path, kind, shape, params, parts):
    with PumiceWriter(path, {"architecture": "tensors"}, check_kinds=False) as writer:
        writer.add_tensor("w", kind, shape, params, parts)


def _rtn_parts(n, k, bits, g, **override):
    groups = -(-k // g)
    parts = {"codes": np.zeros((n, -(-k // 32) * 32 * bits // 8), np.uint8),
             "scales": np.ones((n, groups), np.float16),
             "mins": np.zeros((n, groups), np.float16)}
    parts.update(override)
    return parts


@pytest.mark.parametrize("params,parts,message", [
    ({"bits": 5, "group_size": 32}, _rtn_parts(4, 64, 4, 32), "bits"),
    ({"bits": 4, "group_size": 48}, _rtn_parts(4, 64, 4, 32), "group_size"),
    ({"bits": 4}, _rtn_parts(4, 64, 4, 32), "group_size"),
    ({"bits": 4, "group_size": 32}, _rtn_parts(4, 64, 4, 32, scales=np.ones((4, 2), np.float32)),
     "scales"),
    ({"bits": 4, "group_size": 32}, _rtn_parts(4, 64, 4, 32, codes=np.zeros((4, 31), np.uint8)),
     "codes"),
    ({"bits": 3, "group_size": 32}, _rtn_parts(4, 64, 4, 32), "codes"),
    ({"bits": 4, "group_size": 32}, {"codes": np.zeros((4, 32), np.uint8),
                                     "scales": np.ones((4, 2), np.float16)}, "mins"),
])
def test_rtn_rejects_bad_tensors(tmp_path, params, parts, message):
    path = tmp_path / "bad.pumice"
    _write_single(path, "rtn", [4, 64], params, parts)
    with pytest.raises(PumiceFormatError, match=message) as info:
        NativeModel(path)
    assert "'w'" in str(info.value)


def test_dense_rejects_integer_weights(tmp_path):
    path = tmp_path / "bad.pumice"
    _write_single(path, "dense", [4, 8], {}, {"weight": np.zeros((4, 8), np.int8)})
    with pytest.raises(PumiceFormatError, match="f32, f16 or bf16"):
        NativeModel(path)


def test_unknown_kind_is_unsupported(tmp_path):
    path = tmp_path / "bad.pumice"
    _write_single(path, "ternary_magic", [4, 8], {}, {"weight": np.zeros((4, 8), np.float32)})
    with pytest.raises((UnsupportedError, PumiceFormatError), match="ternary_magic") as info:
        NativeModel(path)
    assert "'w'" in str(info.value)
