# The compiled grid sampler (trilinear.c, trilinear_avx2.c) in Slicer's extension build, as
# _trilinear.abi3.so (_trilinear.pyd) beside DeepRegisterLib.nn.trilinear_sampler, which loads it.
#
#   deepregister_add_trilinear_sampler(<build folder of DeepRegisterLib/nn> <install folder>)
include(${CMAKE_CURRENT_LIST_DIR}/../compiled_module.cmake)
set(DEEPREGISTER_TRILINEAR_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/trilinear.c
  ${CMAKE_CURRENT_LIST_DIR}/trilinear_avx2.c
  )
function(deepregister_add_trilinear_sampler build_dir install_dir)
  add_library(DeepRegisterTrilinear MODULE ${DEEPREGISTER_TRILINEAR_SOURCES})
  # Its ranges run on torch's OpenMP threads. Without OpenMP (or with a runtime other than
  # torch's) the library still builds, and trilinear_sampler leaves the sampling to PyTorch.
  find_package(OpenMP COMPONENTS C)
  if(OpenMP_C_FOUND)
    target_link_libraries(DeepRegisterTrilinear PRIVATE OpenMP::OpenMP_C)
  endif()
  deepregister_compiled_module(DeepRegisterTrilinear _trilinear "${build_dir}" "${install_dir}")
endfunction()
