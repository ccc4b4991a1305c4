file(GLOB _app_srcs CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/*.cpp)
add_executable(shardlm ${_app_srcs})
target_link_libraries(shardlm PRIVATE shardlm_runtime shardlm_warnings)
target_compile_definitions(shardlm PRIVATE SHARDLM_DEFAULT_MODEL_PATH="${SHARDLM_DEFAULT_MODEL_PATH}")
