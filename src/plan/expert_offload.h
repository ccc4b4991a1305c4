// Which layers keep their experts in RAM beside a GPU (llama.cpp's --cpu-moe, --n-cpu-moe N and
// -ot/--override-tensor PATTERN=DEVICE), as a pure function of the model's tensor names: the engine places
// weights by it and the planner counts bytes by it, so the two agree.
#pragma once

#include <string>
#include <vector>

#include "config/model_config.h"

namespace shardlm {

// (n_layer) true where layer l's experts (its ffn_gate/up/down _exps tensors, or per-expert
// blk.l.ffn_*.E.weight) stay in RAM and run on the CPU. n_cpu_moe: the model's first n layers (values
// above n_layer mean all, as --cpu-moe passes). overrides: llama.cpp's -ot values, each "PATTERN=DEVICE"
// or several of them joined by commas; the first pattern whose regular expression is found in a tensor's
// name decides its device: CPU keeps it in RAM, CUDA or CUDA<n> keeps it on the GPU (and before n_cpu_moe,
// as llama.cpp applies -ot first). Throws Error naming the flag and value for a malformed override, an
// invalid regular expression, a device other than these, a non-expert tensor sent to the CPU (attention,
// norms and the router stay on the GPU here), a layer whose three expert tensors would be split between
// the devices, or n_cpu_moe / a CPU override on a model without experts.
std::vector<bool> expert_layers_in_ram(const ModelConfig& c, const std::vector<std::string>& tensor_names,
                                       int n_cpu_moe, const std::vector<std::string>& overrides);

}  // namespace shardlm
