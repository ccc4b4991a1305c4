# Sourced by the multi-GPU scripts: fills mpi_args with CMake flags that point FindMPI at the carried
# Open MPI headers (build-nccl-deps/mpi-include) and the host's libmpi when the machine has no mpicxx.
mpi_args=()
if ! command -v mpicxx >/dev/null || ! mpicxx --showme >/dev/null 2>&1; then
  lib=$(ls /usr/lib/x86_64-linux-gnu/libmpi.so /usr/lib/x86_64-linux-gnu/openmpi/lib/libmpi.so \
        /usr/local/lib/libmpi.so /opt/*/lib/libmpi.so 2>/dev/null | head -1)
  inc=$PWD/build-nccl-deps/mpi-include
  mpi_args=(-DMPI_C_HEADER_DIR=$inc -DMPI_CXX_HEADER_DIR=$inc -DMPI_C_LIB_NAMES=mpi -DMPI_CXX_LIB_NAMES=mpi
            -DMPI_CXX_SKIP_MPICXX=ON -DMPI_mpi_LIBRARY=$lib)
fi
