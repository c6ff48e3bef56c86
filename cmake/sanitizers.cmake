# KVGATE_SANITIZE=address,undefined builds everything with those sanitizers.
if(KVGATE_SANITIZE)
  message(STATUS "kvgate: sanitizers ${KVGATE_SANITIZE}")
  add_compile_options(-fsanitize=${KVGATE_SANITIZE} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  add_link_options(-fsanitize=${KVGATE_SANITIZE})
endif()

# KVGATE_FUZZ=ON (clang++): every library gets libFuzzer's coverage instrumentation; the
# harnesses in fuzz/ link libFuzzer itself.
if(KVGATE_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "KVGATE_FUZZ needs clang++ (libFuzzer): -DCMAKE_CXX_COMPILER=clang++")
  endif()
  add_compile_options(-fsanitize=fuzzer-no-link)
endif()
