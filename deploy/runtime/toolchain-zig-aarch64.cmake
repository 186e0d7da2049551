# Cross-compiling for the RV1126B (64-bit Cortex-A53 Linux) with zig's C compiler, from the ziglang wheel of
# requirements.txt: it links against glibc 2.17's symbols, so the runner starts on old board images too.
#   cmake -S deploy/runtime -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=deploy/runtime/toolchain-zig-aarch64.cmake
# Environment: RKT_PYTHON, the interpreter that has the wheel (default python3); RKT_ZIG_TARGET, zig's target
# (default aarch64-linux-gnu.2.17). For the board SDK's own gcc use toolchain-aarch64.cmake with CROSS_COMPILE.
# Tested with CMake 3.25 (the compiler is zig given with its `cc` argument).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
if(DEFINED ENV{RKT_PYTHON})
  set(RKT_PYTHON "$ENV{RKT_PYTHON}")
else()
  set(RKT_PYTHON python3)
endif()
if(DEFINED ENV{RKT_ZIG_TARGET})
  set(RKT_ZIG_TARGET "$ENV{RKT_ZIG_TARGET}")
else()
  set(RKT_ZIG_TARGET aarch64-linux-gnu.2.17)
endif()
execute_process(COMMAND "${RKT_PYTHON}" -c
                        "import os, ziglang; print(os.path.join(os.path.dirname(ziglang.__file__), 'zig'))"
                OUTPUT_VARIABLE RKT_ZIG OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE RKT_ZIG_FOUND ERROR_QUIET)
if(NOT RKT_ZIG_FOUND EQUAL 0 OR NOT EXISTS "${RKT_ZIG}")
  message(FATAL_ERROR "zig not found through ${RKT_PYTHON}: pip install ziglang==0.17.0 (requirements.txt), or set "
                      "RKT_PYTHON to the python that has it")
endif()
set(CMAKE_C_COMPILER "${RKT_ZIG}" cc)
set(CMAKE_C_COMPILER_TARGET "${RKT_ZIG_TARGET}")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
