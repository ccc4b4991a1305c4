#include "plan/expert_offload.h"

// -ot patterns are ECMAScript regexes, as llama.cpp reads them. With -fsanitize=address GCC 12-14 report a false
// -Wmaybe-uninitialized inside <regex> itself (std::function in _State; GCC bug 105616), hence the pragma (GCC's
// only: clang has no such warning and warns about the unknown name).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <regex>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include "core/error.h"
#include "plan/shard.h"

namespace shardlm {
namespace {

struct Override {
  std::string text;  // as given, for messages
  std::regex re;
  bool cpu = false;
};

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

// The layer of an expert tensor's name, or -1 for any other tensor.
int expert_layer(const std::string& name) {
  const bool exps = ends_with(name, "_exps.weight") &&
                    (name.find(".ffn_gate_exps.") != std::string::npos || name.find(".ffn_up_exps.") != std::string::npos ||
                     name.find(".ffn_down_exps.") != std::string::npos);
  if ((!exps && expert_index(name) < 0) || name.rfind("blk.", 0) != 0) return -1;
  const size_t dot = name.find('.', 4);
  if (dot == std::string::npos || dot == 4 || dot - 4 > 6) return -1;
  for (size_t i = 4; i < dot; ++i)
    if (name[i] < '0' || name[i] > '9') return -1;
  return std::stoi(name.substr(4, dot - 4));
}

std::vector<Override> parse(const std::vector<std::string>& values) {
  std::vector<Override> out;
  for (const std::string& value : values) {
    size_t at = 0;
    while (at <= value.size()) {
      const size_t comma = value.find(',', at);
      const std::string item = value.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
      at = comma == std::string::npos ? value.size() + 1 : comma + 1;
      const size_t eq = item.find('=');  // as llama.cpp splits it
      if (eq == std::string::npos || eq == 0 || eq + 1 == item.size())
        fail("-ot/--override-tensor '", item, "': expected PATTERN=DEVICE, e.g. exps=CPU");
      Override o;
      o.text = item;
      const std::string dev = item.substr(eq + 1);
      const bool cuda = dev == "CUDA" || (dev.rfind("CUDA", 0) == 0 && dev.size() > 4 &&
                                          dev.find_first_not_of("0123456789", 4) == std::string::npos);
      if (dev != "CPU" && !cuda)
        fail("-ot/--override-tensor '", item, "': device '", dev, "' is not CPU, CUDA or CUDA<n>");
      o.cpu = dev == "CPU";
      try {
        o.re = std::regex(item.substr(0, eq), std::regex::ECMAScript);
      } catch (const std::regex_error& e) {
        fail("-ot/--override-tensor '", item, "': '", item.substr(0, eq), "' is not a regular expression (", e.what(), ")");
      }
      out.push_back(std::move(o));
    }
  }
  return out;
}

}  // namespace

std::vector<bool> expert_layers_in_ram(const ModelConfig& c, const std::vector<std::string>& tensor_names,
                                       int n_cpu_moe, const std::vector<std::string>& overrides) {
  if (n_cpu_moe < 0) fail("--n-cpu-moe ", n_cpu_moe, " must be >= 0");
  if (n_cpu_moe > 0 && !c.moe())
    fail("--cpu-moe/--n-cpu-moe: the model has no experts (it is not a mixture of experts)");
  const std::vector<Override> ovr = parse(overrides);
  const size_t n_layer = static_cast<size_t>(c.n_layer);
  std::vector<int> cpu(n_layer, 0), gpu(n_layer, 0);  // expert tensors of each layer sent to each side
  for (const std::string& given : tensor_names) {
    // One tensor per expert (Hugging Face directories, old GGUF files) is matched under llama.cpp's 3-D
    // name, blk.L.ffn_up.E.weight as blk.L.ffn_up_exps.weight, so that the usual patterns ("exps=CPU") apply.
    std::string name = given;
    if (expert_index(given) >= 0) {
      const size_t e = given.rfind('.', given.size() - 8);  // the dot before E
      name = given.substr(0, e) + "_exps.weight";
    }
    const int l = expert_layer(name);
    int decided = -1;  // 1: CPU, 0: GPU, -1: no override matched
    for (const Override& o : ovr)
      if (std::regex_search(name, o.re)) {
        decided = o.cpu ? 1 : 0;
        if (o.cpu && l < 0)
          fail("-ot/--override-tensor '", o.text, "' sends '", name, "' to the CPU: only expert tensors (ffn_*_exps) "
               "stay in RAM beside a GPU here; attention, norms and the router run on the GPU");
        break;
      }
    if (l < 0 || static_cast<size_t>(l) >= n_layer) continue;
    if (decided < 0) decided = l < n_cpu_moe ? 1 : 0;
    (decided == 1 ? cpu : gpu)[static_cast<size_t>(l)] += 1;
  }
  std::vector<bool> in_ram(n_layer, false);
  for (size_t l = 0; l < n_layer; ++l) {
    if (cpu[l] > 0 && gpu[l] > 0)
      fail("-ot/--override-tensor: layer ", l, " would keep ", cpu[l], " of its expert tensors in RAM and ", gpu[l],
           " on the GPU; its ffn_gate_exps, ffn_up_exps and ffn_down_exps must go together");
    in_ram[l] = cpu[l] > 0;
  }
  return in_ram;
}

}  // namespace shardlm
