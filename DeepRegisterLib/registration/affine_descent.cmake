# The affine search's compiled descent (affine_descent.c) in Slicer's extension build, as
# _affine_descent.abi3.so (_affine_descent.pyd) beside
# DeepRegisterLib.registration.affine_descent, which loads it.
#
#   deepregister_add_affine_descent(<build folder of DeepRegisterLib/registration> <install folder>)
include(${CMAKE_CURRENT_LIST_DIR}/../compiled_module.cmake)
set(DEEPREGISTER_AFFINE_DESCENT_SOURCE ${CMAKE_CURRENT_LIST_DIR}/affine_descent.c)
function(deepregister_add_affine_descent build_dir install_dir)
  add_library(DeepRegisterAffineDescent MODULE ${DEEPREGISTER_AFFINE_DESCENT_SOURCE})
  deepregister_compiled_module(
    DeepRegisterAffineDescent _affine_descent "${build_dir}" "${install_dir}")
  if(NOT MSVC)
    # GCC 12's basic-block vectoriser dropped the (double)(float) roundings of two lanes: the
    # poses then changed with the optimisation level (pyproject.toml says the same).
    target_compile_options(DeepRegisterAffineDescent PRIVATE -fno-tree-slp-vectorize)
  endif()
endfunction()
