// libFuzzer target: the llama2.c checkpoint reader (seven int32 hyper-parameters, then float32 weights) on
// arbitrary bytes, paired with the fixtures' tokenizer file, through a file as `shardlm convert --from
// llama2c` reads it. Refusals are shardlm::Error; nothing may crash or read out of bounds.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "core/error.h"
#include "loader/llama2c_source.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace shardlm;
  static const std::string path = "/dev/shm/shardlm-fuzz-" + std::to_string(getpid()) + ".bin";
  static const std::string tok = std::string(SHARDLM_FUZZ_DATA_DIR) + "/models/aidreams260K.tok512.bin";
  FILE* out = std::fopen(path.c_str(), "wb");
  if (!out) return 0;
  std::fwrite(data, 1, size, out);
  std::fclose(out);
  try {
    auto src = open_llama2c_source(path, tok);
    uint64_t sum = static_cast<uint64_t>(src->config().n_layer) + src->tensors().size();
    (void)sum;
  } catch (const Error&) {
  }
  std::remove(path.c_str());
  return 0;
}
