"""A GGUF file with a tensor of every type hone reads (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1, Q4_K, Q5_K, Q6_K) and metadata of every value type, plus the `gguf` package's own
dequantization of each tensor, for hone to equal bit for bit.

    python tests/reference/make_gguf_fixtures.py
"""
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "gguf"
ROWS, COLS = 4, 256
# Block sizes in bytes of the K-quants (256 values), which the package cannot quantize: their
# blocks are random bytes with small, finite f16 scales.
K_LAYOUT = {T.Q4_K: (144, [0, 2]), T.Q5_K: (176, [0, 2]), T.Q6_K: (210, [208])}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    w = GGUFWriter(str(OUT / "types.gguf"), arch="llama")
    w.add_uint8("test.u8", 7)
    w.add_int32("test.i32", -42)
    w.add_uint64("test.u64", 1 << 40)
    w.add_float32("test.f32", 0.25)
    w.add_float64("test.f64", -1.5)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo")
    w.add_array("test.strings", ["a", "bc", ""])
    w.add_array("test.ints", [1, -2, 3])
    expected = {}
    for t in [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]:
        values = (rng.standard_normal((ROWS, COLS)) * 0.5).astype(np.float32)
        if t == T.F32:
            raw = values
        elif t in K_LAYOUT:
            size, scale_offsets = K_LAYOUT[t]
            raw = rng.integers(0, 256, size=(ROWS, COLS // 256 * size), dtype=np.uint8)
            for b in range(COLS // 256):
                for off in scale_offsets:
                    raw[:, b * size + off: b * size + off + 2] = np.float16(rng.uniform(0.001, 0.05, ROWS)).view(np.uint8).reshape(ROWS, 2)
        else:
            raw = quantize(values, t)
        w.add_tensor(f"t.{t.name.lower()}", raw, raw_dtype=t)
        expected[t.name.lower()] = dequantize(raw, t).astype(np.float32).reshape(ROWS, COLS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(expected, str(OUT / "expected.safetensors"))
    print({k: v.shape for k, v in expected.items()})


if __name__ == "__main__":
    main()
