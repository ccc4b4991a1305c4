// llama-imatrix's importance matrix, as llama-quantize reads it (--imatrix FILE).
#pragma once

#include <map>
#include <string>
#include <vector>

namespace shardlm {

struct ImportanceMatrix {
  std::string path;  // the file it was read from
  // Per weight tensor name: (ne[0] * n_expert) importances, one per input column of each expert's matrix, each
  // the mean squared activation that column saw (llama-imatrix's in_sum2 / counts; 1 where nothing was counted),
  // exactly as llama-quantize normalizes them.
  std::map<std::string, std::vector<float>> entries;
  std::vector<std::string> datasets;  // imatrix.datasets: the texts it was computed on
  int64_t chunk_count = 0;
};

// Reads the GGUF format llama-imatrix writes by default ("<tensor>.in_sum2" F32 (ne0 * n_expert) and
// "<tensor>.counts" F32 (n_expert) per tensor). Throws Error naming the file and the entry on anything malformed;
// the legacy .dat format is refused with a message saying how to convert it.
ImportanceMatrix load_imatrix(const std::string& path);

}  // namespace shardlm
