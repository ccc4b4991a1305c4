#!/usr/bin/python3
"""Records gguf-py's dequantization (llama.cpp's independent numpy decoders, gguf/quants.py) of random blocks
of every quantized weight type into tests/data/quant/gguf_py_dequant.bin; test_quant_gguf_py checks that our
dequantize_row gives the same values. Block bytes are random, except the scale fields, which are set to finite
fp16 (or e8m0) values so that the expected values are finite.

  scripts/record_gguf_py_dequant.py ../shared/peers/llama.cpp-d32676d.tar.xz   (needs numpy)

File format (little-endian), records until the end of the file:
  u32 ggml type, u32 n_elements, u32 n_bytes, n_bytes block bytes, n_elements float32 values.
"""
import os
import struct
import sys
import tarfile
import tempfile

import numpy as np

# ggml type -> (name, byte offsets of fp16 scale fields in each block). IQ1_M and MXFP4 are handled apart.
TYPES = {
    2: ("Q4_0", [0]), 3: ("Q4_1", [0, 2]), 6: ("Q5_0", [0]), 7: ("Q5_1", [0, 2]), 8: ("Q8_0", [0]),
    10: ("Q2_K", [80, 82]), 11: ("Q3_K", [108]), 12: ("Q4_K", [0, 2]), 13: ("Q5_K", [0, 2]), 14: ("Q6_K", [208]),
    16: ("IQ2_XXS", [0]), 17: ("IQ2_XS", [0]), 18: ("IQ3_XXS", [0]), 19: ("IQ1_S", [0]), 20: ("IQ4_NL", [0]),
    21: ("IQ3_S", [0]), 22: ("IQ2_S", [0]), 23: ("IQ4_XS", [0]), 29: ("IQ1_M", []), 39: ("MXFP4", []),
}
N_BLOCKS = 6  # per type: 6 blocks of 256 (or 48 blocks of 32) elements


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} LLAMA_CPP_TARBALL")
    out_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "quant",
                            "gguf_py_dequant.bin")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sys.argv[1]) as tar:
            members = [m for m in tar.getmembers() if "gguf-py/gguf/" in m.name]
            tar.extractall(tmp, members=members)
        root = next(os.path.join(d, "gguf-py") for d, subdirs, _ in os.walk(tmp) if "gguf-py" in subdirs)
        sys.path.insert(0, root)
        from gguf import quants
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        rng = np.random.default_rng(20261206)
        records = []
        for t, (name, f16_offsets) in TYPES.items():
            qt = GGMLQuantizationType(t)
            block, size = GGML_QUANT_SIZES[qt]
            n_blocks = N_BLOCKS * (256 // block)
            raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
            scales = rng.uniform(-0.05, 0.05, size=(n_blocks, 4)).astype(np.float16)
            for j, off in enumerate(f16_offsets):
                raw[:, off:off + 2] = scales[:, j:j + 1].view(np.uint8).reshape(n_blocks, 2)
            if name == "IQ1_M":
                # The fp16 block scale is spread over the top nibbles of the four u16 scale words (bytes 48..55).
                d = np.abs(scales[:, 0]).view(np.uint16)
                words = raw[:, 48:56].copy().view(np.uint16).reshape(n_blocks, 4) & np.uint16(0x0FFF)
                for k in range(4):
                    words[:, k] |= ((d >> np.uint16(4 * k)) & np.uint16(0xF)) << np.uint16(12)
                raw[:, 48:56] = words.view(np.uint8).reshape(n_blocks, 8)
            if name == "MXFP4":
                raw[:, 0] = rng.integers(110, 135, size=n_blocks, dtype=np.uint8)  # e8m0 exponents near 1
            values = quants.dequantize(raw.reshape(-1), qt).astype(np.float32).reshape(-1)
            assert values.size == n_blocks * block and np.all(np.isfinite(values)), name
            records.append(struct.pack("<III", t, values.size, raw.size) + raw.tobytes() + values.tobytes())
            print(f"{name}: {n_blocks} blocks, {values.size} values, max |v| {np.abs(values).max():.4g}")
    with open(out_path, "wb") as f:
        for r in records:
            f.write(r)
    print("wrote", os.path.normpath(out_path))


if __name__ == "__main__":
    main()
