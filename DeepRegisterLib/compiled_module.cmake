# A compiled part of DeepRegisterLib in Slicer's extension build: a plain shared library without
# Python, named as Python names an extension module (<name>.abi3.so, <name>.pyd), built into and
# installed in the folder of the Python module that finds it there and loads it with ctypes
# (nn/trilinear.cmake, registration/affine_descent.cmake).
#
#   deepregister_compiled_module(<target> <name> <build folder> <install folder>)
function(deepregister_compiled_module target name build_dir install_dir)
  target_compile_definitions(${target} PRIVATE DR_WITHOUT_PYTHON)
  if(WIN32)
    set(suffix ".pyd")
  else()
    set(suffix ".abi3.so")
  endif()
  if(NOT MSVC)
    # As Python builds its extension modules: integer overflow wraps (a point far outside). No
    # multiply-add fused where the flags target a CPU with FMA: PyTorch's sampler rounds each
    # step, and the affine search takes the same steps on every CPU.
    target_compile_options(${target} PRIVATE -fwrapv -ffp-contract=off)
    target_link_libraries(${target} PRIVATE m)
  endif()
  set_target_properties(${target} PROPERTIES
    PREFIX ""
    OUTPUT_NAME "${name}"
    SUFFIX "${suffix}"
    C_VISIBILITY_PRESET hidden
    # A generator expression: multi-configuration generators then add no Release/ folder.
    LIBRARY_OUTPUT_DIRECTORY "$<1:${build_dir}>"
    )
  install(TARGETS ${target}
    LIBRARY DESTINATION "${install_dir}" COMPONENT RuntimeLibraries
    )
endfunction()
