#!/usr/bin/python3
"""Records which type llama.cpp's llama-quantize gives each tensor under each scheme, for test presets, into
tests/data/quant/llama_quantize_types.json; test_presets checks our tensor_type_for_scheme against it.
The input files are F32 files of the presets from `shardlm gen-model` (only their shapes and names matter);
the output files are read with gguf-py's GGUFReader (llama.cpp's own Python reader). Each scheme is recorded
without an importance matrix (where llama-quantize allows that) and, as "SCHEME+imatrix", with one from
llama-imatrix (a few of llama.cpp's type rules depend on it).

  scripts/record_llama_quantize_types.py LLAMA_BIN_DIR LLAMA_CPP_TARBALL SHARDLM [WORK_DIR]
"""
import json
import os
import subprocess
import sys
import tarfile
import tempfile

PRESETS = ["tiny", "tiny-k", "tiny-gqa4", "tiny-qwen2", "tiny-qwen3moe", "tiny-mixtral"]
SCHEMES = ["q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0", "iq4_nl",
           "iq4_xs", "q3_k_l", "q3_k_m", "q3_k_s", "iq3_m", "iq3_s", "q2_k"]
IMATRIX_SCHEMES = ["iq3_xs", "iq3_xxs", "q2_k_s", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s"]


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(f"usage: {sys.argv[0]} LLAMA_BIN_DIR LLAMA_CPP_TARBALL SHARDLM [WORK_DIR]")
    bindir, tarball, shardlm = sys.argv[1:4]
    quantize = os.path.join(bindir, "llama-quantize")
    text = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "text", "fsf-licenses.txt")
    work = sys.argv[4] if len(sys.argv) == 5 else tempfile.mkdtemp(prefix="llama-quantize-types-")
    os.makedirs(work, exist_ok=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(work, members=[m for m in tar.getmembers() if "gguf-py/gguf/" in m.name])
    root = next(os.path.join(d, "gguf-py") for d, subdirs, _ in os.walk(work) if "gguf-py" in subdirs)
    sys.path.insert(0, root)
    from gguf.gguf_reader import GGUFReader

    out = {"llama_cpp": os.path.basename(tarball), "presets": {}}
    for preset in PRESETS:
        f32 = os.path.join(work, f"{preset}-f32.gguf")
        subprocess.run([shardlm, "gen-model", "--arch", preset, "--type", "f32", "-o", f32, "-q"], check=True)
        imatrix = os.path.join(work, f"{preset}-imatrix.gguf")
        subprocess.run([os.path.join(bindir, "llama-imatrix"), "-m", f32, "-f", text, "-c", "128", "--chunks", "4",
                        "-t", "2", "-o", imatrix], check=True, capture_output=True)
        out["presets"][preset] = {}
        runs = [(s, False) for s in SCHEMES] + [(s, True) for s in SCHEMES + IMATRIX_SCHEMES]
        for scheme, with_imatrix in runs:
            q = os.path.join(work, f"{preset}-{scheme}.gguf")
            cmd = [quantize] + (["--imatrix", imatrix] if with_imatrix else []) + [f32, q, scheme.upper(), "2"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"llama-quantize {preset} {scheme} failed:\n{r.stdout}\n{r.stderr}")
            reader = GGUFReader(q)
            key = scheme + ("+imatrix" if with_imatrix else "")
            out["presets"][preset][key] = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
            os.remove(q)
            print(preset, key, "ok", flush=True)
        os.remove(f32)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "quant",
                        "llama_quantize_types.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote", os.path.normpath(path))


if __name__ == "__main__":
    main()
