// MPI as launcher, control plane and host-memory transport. Works across hosts: ranks find each other
// through MPI only.
#pragma once

#include <memory>

#include "comm/communicator.h"
#include "comm/launcher.h"  // launched_by_mpi()

namespace shardlm {

// Initializes MPI (thread level FUNNELED) on creation and finalizes it on destruction. A peer that stops
// answering for `timeout_s` seconds inside any call makes this rank print which rank it waited for and
// abort the job (so no rank hangs when another dies).
std::unique_ptr<Communicator> make_mpi_communicator(int* argc, char*** argv, double timeout_s);

}  // namespace shardlm
