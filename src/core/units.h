#pragma once

#include <cstdint>
#include <string>

namespace shardlm {

// "1.52 MiB": binary units, as drivers and `free` report memory.
std::string human_bytes(uint64_t bytes);

}  // namespace shardlm
