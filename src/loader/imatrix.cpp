#include "loader/imatrix.h"

#include <cmath>
#include <cstring>
#include <memory>

#include "core/error.h"
#include "formats/gguf.h"

namespace shardlm {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::vector<float> f32_values(const GgufFile& f, const GgufTensorInfo& t) {
  if (t.type != GgmlType::F32)
    fail(f.path(), ": imatrix entry '", t.name, "' is ", type_name(t.type), ", expected f32");
  std::vector<float> v(static_cast<size_t>(t.n_elements));
  std::memcpy(v.data(), f.tensor_data(t), v.size() * sizeof(float));
  for (float x : v)
    if (!std::isfinite(x) || x < 0) fail(f.path(), ": imatrix entry '", t.name, "' holds ", x, " (expected >= 0)");
  return v;
}

}  // namespace

ImportanceMatrix load_imatrix(const std::string& path) {
  std::unique_ptr<GgufFile> f;
  try {
    f = GgufFile::open(path);
  } catch (const Error& e) {
    fail_kind(e.kind(), "--imatrix: ", e.what(),
              " (shardlm reads the GGUF imatrix format llama-imatrix writes by default; convert a legacy .dat file "
              "with llama-imatrix --in-file OLD.dat -o NEW.gguf)");
  }
  const auto type = f->get_string("general.type");
  if (type && *type != "imatrix") fail(path, ": general.type is '", *type, "', not an imatrix");
  ImportanceMatrix m;
  m.path = path;
  if (auto d = f->get_string_array("imatrix.datasets")) m.datasets = *d;
  m.chunk_count = static_cast<int64_t>(f->get_uint("imatrix.chunk_count").value_or(0));
  const std::string sums_suffix = ".in_sum2", counts_suffix = ".counts";
  for (const auto& t : f->tensors()) {
    if (!ends_with(t.name, sums_suffix)) {
      if (!ends_with(t.name, counts_suffix)) fail(path, ": unexpected imatrix entry '", t.name, "'");
      continue;
    }
    const std::string name = t.name.substr(0, t.name.size() - sums_suffix.size());
    const GgufTensorInfo* c = f->find_tensor(name + counts_suffix);
    if (c == nullptr) fail(path, ": imatrix entry '", t.name, "' has no '", name, counts_suffix, "'");
    const std::vector<float> sums = f32_values(*f, t), counts = f32_values(*f, *c);
    if (counts.empty() || sums.size() % counts.size() != 0)
      fail(path, ": imatrix entry '", name, "' has ", sums.size(), " sums for ", counts.size(),
           " counts (the sums must be a whole number of rows per count)");
    // llama-quantize's normalization: the mean over the tokens counted, 1 for an expert nothing reached.
    const size_t ne0 = sums.size() / counts.size();
    std::vector<float> e(sums.size());
    for (size_t j = 0; j < counts.size(); ++j)
      for (size_t i = 0; i < ne0; ++i) e[j * ne0 + i] = counts[j] > 0.0f ? sums[j * ne0 + i] / counts[j] : 1.0f;
    m.entries.emplace(name, std::move(e));
  }
  if (m.entries.empty()) fail(path, ": the imatrix holds no entries");
  return m;
}

}  // namespace shardlm
