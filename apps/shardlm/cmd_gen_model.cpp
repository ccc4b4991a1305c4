// gen-model: GGUF files with deterministic random weights, so that 8B and 70B benchmarks run where no
// weights can be downloaded. Quantized tensors are synthesized block by block (random codes, scales
// chosen so weights have a standard deviation near 0.02) instead of quantizing floats, which keeps a
// 40 GB file a matter of disk speed.
#include <algorithm>
#include <cstring>
#include <exception>
#include <thread>

#include "cli_common.h"
#include "commands.h"
#include "config/presets.h"
#include "core/error.h"
#include "loader/gguf_export.h"
#include "quant/quant.h"

namespace shardlm {
namespace {

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform in [-1, 1).
float unit(uint64_t& s) { return float(double(splitmix(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0); }

void put_f16(uint8_t* p, float v) {
  const uint16_t h = fp32_to_fp16(v);
  std::memcpy(p, &h, 2);
}

// Fills `n_blocks` blocks of `type` starting at block index `first` of the tensor.
void fill_blocks(GgmlType type, uint8_t* dst, int64_t first, int64_t n_blocks, uint64_t seed) {
  uint64_t s = seed ^ (uint64_t(first) * 0x2545F4914F6CDD1Dull);
  const int64_t bs = type_size(type);
  uint8_t* p = dst + first * bs;
  switch (type) {
    case GgmlType::F32:
      for (int64_t i = 0; i < n_blocks; ++i) {
        const float v = 0.035f * unit(s);  // uniform with std 0.02
        std::memcpy(p + 4 * i, &v, 4);
      }
      return;
    case GgmlType::F16:
      for (int64_t i = 0; i < n_blocks; ++i) put_f16(p + 2 * i, 0.035f * unit(s));
      return;
    case GgmlType::BF16:
      for (int64_t i = 0; i < n_blocks; ++i) {
        const uint16_t h = fp32_to_bf16(0.035f * unit(s));
        std::memcpy(p + 2 * i, &h, 2);
      }
      return;
    default:
      break;
  }
  // Random code bytes, then valid scales at the places each block format keeps them.
  for (int64_t i = 0; i < n_blocks * bs; i += 8) {
    const uint64_t r = splitmix(s);
    std::memcpy(p + i, &r, static_cast<size_t>(std::min<int64_t>(8, n_blocks * bs - i)));
  }
  for (int64_t b = 0; b < n_blocks; ++b) {
    uint8_t* blk = p + b * bs;
    switch (type) {
      case GgmlType::Q8_0: put_f16(blk, 0.02f / 73.0f); break;        // int8 codes: std ~73
      case GgmlType::Q4_0: put_f16(blk, 0.02f / 4.6f); break;         // codes - 8: std ~4.6
      case GgmlType::Q4_K:
        put_f16(blk, 0.02f / (4.3f * 32.0f));                         // d * 6-bit scale * nibble
        put_f16(blk + 2, 0.02f / (32.0f * 8.0f));                      // dmin * 6-bit min
        break;
      case GgmlType::Q6_K: put_f16(blk + 208, 0.02f / (18.0f * 74.0f)); break;  // d * int8 scale * (q-32)
      // The other types: a block scale giving weights of roughly the same spread (std ~0.02) from the random
      // codes: 1 / (spread of the code values x the mean sub-block scale), mins near the codes' mean.
      case GgmlType::Q4_1:  // d * q + m, q 0..15
        put_f16(blk, 0.02f / 4.6f);
        put_f16(blk + 2, -7.5f * 0.02f / 4.6f);
        break;
      case GgmlType::Q5_0: put_f16(blk, 0.02f / 9.2f); break;  // q - 16, q 0..31
      case GgmlType::Q5_1:
        put_f16(blk, 0.02f / 9.2f);
        put_f16(blk + 2, -15.5f * 0.02f / 9.2f);
        break;
      case GgmlType::Q2_K:  // d * (sc & 15) * q - dmin * (sc >> 4), q 0..3
        put_f16(blk + 80, 0.02f / (7.5f * 1.1f));
        put_f16(blk + 82, 1.5f * 0.02f / (7.5f * 1.1f));
        break;
      case GgmlType::Q3_K: put_f16(blk + 108, 0.02f / (18.0f * 2.3f)); break;  // d * (sc - 32) * (q - 4)
      case GgmlType::Q5_K:  // as Q4_K with 5-bit codes
        put_f16(blk, 0.02f / (9.2f * 32.0f));
        put_f16(blk + 2, 0.02f / (32.0f * 16.0f));
        break;
      case GgmlType::IQ4_NL: put_f16(blk, 0.02f / 70.0f); break;            // d * kvalues (std ~70)
      case GgmlType::IQ4_XS: put_f16(blk, 0.02f / (18.0f * 70.0f)); break;  // d * (ls - 32) * kvalues
      case GgmlType::MXFP4: blk[0] = 120; break;  // 2^(120-128) * e2m1 values (std ~6): std ~0.023
      case GgmlType::IQ2_XXS: case GgmlType::IQ2_XS: case GgmlType::IQ2_S:  // d * (0.5 + ls) / 4 * grid (8..43)
        put_f16(blk, 0.02f / (2.0f * 25.0f));
        break;
      case GgmlType::IQ3_XXS: case GgmlType::IQ3_S:  // d * (0.5 + ls) / 2 * grid (4..62)
        put_f16(blk, 0.02f / (4.0f * 30.0f));
        break;
      case GgmlType::IQ1_S: put_f16(blk, 0.02f / 15.0f); break;  // d * (2 ls + 1) * (-1..1 + delta)
      case GgmlType::IQ1_M: {  // the fp16 scale lives in the top nibbles of the four scale words (bytes 48..55)
        const uint16_t d = fp32_to_fp16(0.02f / 15.0f);
        for (int k = 0; k < 4; ++k) blk[49 + 2 * k] = static_cast<uint8_t>((blk[49 + 2 * k] & 0x0F) | (((d >> (4 * k)) & 0xF) << 4));
        break;
      }
      default: fail("gen-model cannot synthesize ", type_name(type), " blocks");
    }
  }
}

}  // namespace

int cmd_gen_model(int argc, const char* const* argv) {
  CLI::App app("Write a GGUF file with deterministic random weights for a model preset (standard tensor names "
               "and metadata; llama.cpp loads it too).",
               "gen-model");
  std::string arch, type = "f16", out;
  uint64_t seed = 1;
  bool sparse = false, list = false, quiet = false;
  int threads = 0;
  app.add_option("--arch,--preset", arch, "model preset (--list shows them)");
  app.add_option("--type", type, "weight scheme: " + scheme_names());
  app.add_option("--seed", seed, "random seed");
  app.add_option("-o,--output", out, "output GGUF path");
  app.add_option("-t,--threads", threads, "threads for synthesis (default: all cores)");
  app.add_flag("--sparse", sparse, "write metadata and tensor table only; the data is a hole of zeros (for "
               "inspecting 70B+ presets without the disk space)");
  app.add_flag("--list", list, "list the presets");
  app.add_flag("-q,--quiet", quiet, "no progress output");
  if (int rc = parse_cli(app, argc, argv); rc >= 0) return rc;
  if (list) {
    for (const Preset& p : presets()) std::printf("%-16s %s\n", p.name.c_str(), p.description.c_str());
    return 0;
  }
  if (arch.empty()) fail("--arch is required (one of: ", preset_names(), ")");
  if (out.empty()) fail("-o is required");
  const Preset* p = find_preset(arch);
  if (!p) fail("--arch '", arch, "' is not a preset (", preset_names(), ")");
  if (!is_known_scheme(type)) fail("--type '", type, "' is not a scheme (", scheme_names(), ")");
  const ModelConfig& c = p->config;
  const int n_thr = threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

  // A SentencePiece-style vocabulary of the preset's size: control tokens, 256 byte tokens, then
  // placeholder pieces; enough for llama.cpp to load the file and for our tokenizer to round-trip bytes.
  Vocab v;
  v.model = Vocab::Model::kSpm;
  v.bos = 1;
  v.eos = 2;
  v.unk = 0;
  for (int64_t i = 0; i < c.n_vocab; ++i) {
    TokenType t = TokenType::kNormal;
    std::string piece;
    if (i == 0) piece = "<unk>", t = TokenType::kUnknown;
    else if (i == 1) piece = "<s>", t = TokenType::kControl;
    else if (i == 2) piece = "</s>", t = TokenType::kControl;
    else if (i < 259) {
      char b[8];
      std::snprintf(b, sizeof b, "<0x%02X>", unsigned(i - 3));
      piece = b;
      t = TokenType::kByte;
    } else {
      piece = "\xE2\x96\x81t" + std::to_string(i);
    }
    v.tokens.push_back(piece);
    v.scores.push_back(-float(i));
    v.types.push_back(t);
  }
  GgufWriter w;
  ModelConfig named = c;
  named.name = p->name + " (random weights, seed " + std::to_string(seed) + ")";
  write_model_metadata(w, named, &v, "");
  w.set_sparse(sparse);
  const std::vector<float> rf = llama3_rope_freq_factors(c);
  if (!rf.empty()) w.add_tensor("rope_freqs.weight", GgmlType::F32, {static_cast<int64_t>(rf.size())}, rf.data());
  uint64_t index = 0;
  for (const TensorSpec& t : model_tensors(c)) {
    // Synthesized blocks need no importance matrix, but real files of the schemes that need one are made with one.
    const GgmlType ty = tensor_type_for_scheme(type, t, c, scheme_needs_imatrix(type));
    const bool is_norm = t.ne.size() == 1 && t.name.find("norm") != std::string::npos;
    const uint64_t tseed = seed * 0x9E3779B97F4A7C15ull + (++index);
    w.add_tensor(t.name, ty, t.ne, [ty, is_norm, tseed, n_thr](uint8_t* dst, size_t bytes) {
      const int64_t n_blocks = static_cast<int64_t>(bytes) / type_size(ty);
      if (is_norm && ty == GgmlType::F32) {
        // Norm weights near 1, as trained models have them, so activations keep their scale.
        uint64_t s = tseed;
        for (int64_t i = 0; i < n_blocks; ++i) {
          const float x = 1.0f + 0.1f * unit(s);
          std::memcpy(dst + 4 * i, &x, 4);
        }
        return;
      }
      // Fixed chunks seeded by their index: the bytes do not depend on the number of threads.
      constexpr int64_t kChunk = 4096;
      const int64_t n_chunks = (n_blocks + kChunk - 1) / kChunk;
      const int parts = static_cast<int>(std::min<int64_t>(n_thr, n_chunks));
      std::vector<std::thread> pool;
      std::vector<std::exception_ptr> errors(static_cast<size_t>(parts));  // a worker's error, rethrown here
      for (int k = 0; k < parts; ++k)
        pool.emplace_back([=, &errors] {
          try {
            for (int64_t ch = k; ch < n_chunks; ch += parts)
              fill_blocks(ty, dst, ch * kChunk, std::min(kChunk, n_blocks - ch * kChunk), tseed);
          } catch (...) {
            errors[static_cast<size_t>(k)] = std::current_exception();
          }
        });
      for (auto& th : pool) th.join();
      for (const auto& e : errors)
        if (e) std::rethrow_exception(e);
    });
  }
  Progress progress("writing " + out, !quiet);
  write_output_file(out, "-o", {},
                    [&](const std::string& tmp) { w.write(tmp, [&](uint64_t d, uint64_t t) { progress(d, t); }); });
  progress.finish();
  return 0;
}

}  // namespace shardlm
