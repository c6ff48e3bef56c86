# KVGATE_SANITIZE=address,undefined builds everything with those sanitizers.
if(KVGATE_SANITIZE)
  message(STATUS "kvgate: sanitizers ${KVGATE_SANITIZE}")
  add_compile_options(-fsanitize=${KVGATE_SANITIZE} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  add_link_options(-fsanitize=${KVGATE_SANITIZE})
endif()
