# The compiled grid sampler (trilinear.c, trilinear_avx2.c) in Slicer's extension build: a plain
# shared library without Python, named as Python names an extension module (_trilinear.abi3.so,
# _trilinear.pyd), so that DeepRegisterLib.nn.trilinear_sampler finds it beside itself and loads it with ctypes.
#
#   deepregister_add_trilinear_sampler(<build folder of DeepRegisterLib/nn> <install folder>)
set(DEEPREGISTER_TRILINEAR_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/trilinear.c
  ${CMAKE_CURRENT_LIST_DIR}/trilinear_avx2.c
  )
function(deepregister_add_trilinear_sampler build_dir install_dir)
  add_library(DeepRegisterTrilinear MODULE ${DEEPREGISTER_TRILINEAR_SOURCES})
  target_compile_definitions(DeepRegisterTrilinear PRIVATE DR_WITHOUT_PYTHON)
  # Its ranges run on torch's OpenMP threads. Without OpenMP (or with a runtime other than
  # torch's) the library still builds, and trilinear_sampler leaves the sampling to PyTorch.
  find_package(OpenMP COMPONENTS C)
  if(OpenMP_C_FOUND)
    target_link_libraries(DeepRegisterTrilinear PRIVATE OpenMP::OpenMP_C)
  endif()
  if(WIN32)
    set(suffix ".pyd")
  else()
    set(suffix ".abi3.so")
  endif()
  if(NOT MSVC)
    # As Python builds its extension modules: integer overflow wraps (a point far outside). No
    # multiply-add fused where the flags target a CPU with FMA: PyTorch's sampler rounds each step.
    target_compile_options(DeepRegisterTrilinear PRIVATE -fwrapv -ffp-contract=off)
    target_link_libraries(DeepRegisterTrilinear PRIVATE m)
  endif()
  set_target_properties(DeepRegisterTrilinear PROPERTIES
    PREFIX ""
    OUTPUT_NAME "_trilinear"
    SUFFIX "${suffix}"
    C_VISIBILITY_PRESET hidden
    # A generator expression: multi-configuration generators then add no Release/ folder.
    LIBRARY_OUTPUT_DIRECTORY "$<1:${build_dir}>"
    )
  install(TARGETS DeepRegisterTrilinear
    LIBRARY DESTINATION "${install_dir}" COMPONENT RuntimeLibraries
    )
endfunction()
