# Cross-compiling for the RV1126B (64-bit Cortex-A53 Linux):
#   cmake -S deploy/runtime -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=deploy/runtime/toolchain-aarch64.cmake
# The compiler is ${CROSS_COMPILE}gcc, CROSS_COMPILE defaulting to aarch64-linux-gnu- (Debian's
# gcc-aarch64-linux-gnu); point it at the board SDK's toolchain with e.g. CROSS_COMPILE=/opt/sdk/bin/aarch64-buildroot-linux-gnu-.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
if(DEFINED ENV{CROSS_COMPILE})
  set(CMAKE_C_COMPILER "$ENV{CROSS_COMPILE}gcc")
else()
  set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
endif()
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
