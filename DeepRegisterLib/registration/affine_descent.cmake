# The affine search's compiled descent (affine_descent.c) in Slicer's extension build: a plain
# shared library without Python, named as Python names an extension module
# (_affine_descent.abi3.so, _affine_descent.pyd), so that
# DeepRegisterLib.registration.affine_descent finds it beside itself and loads it with ctypes.
#
#   deepregister_add_affine_descent(<build folder of DeepRegisterLib/registration> <install folder>)
set(DEEPREGISTER_AFFINE_DESCENT_SOURCE ${CMAKE_CURRENT_LIST_DIR}/affine_descent.c)
function(deepregister_add_affine_descent build_dir install_dir)
  add_library(DeepRegisterAffineDescent MODULE ${DEEPREGISTER_AFFINE_DESCENT_SOURCE})
  target_compile_definitions(DeepRegisterAffineDescent PRIVATE DR_WITHOUT_PYTHON)
  if(WIN32)
    set(suffix ".pyd")
  else()
    set(suffix ".abi3.so")
  endif()
  if(NOT MSVC)
    # The same steps on every CPU: no multiply-add fused where the flags target one with FMA.
    target_compile_options(DeepRegisterAffineDescent PRIVATE -ffp-contract=off)
    target_link_libraries(DeepRegisterAffineDescent PRIVATE m)
  endif()
  set_target_properties(DeepRegisterAffineDescent PROPERTIES
    PREFIX ""
    OUTPUT_NAME "_affine_descent"
    SUFFIX "${suffix}"
    C_VISIBILITY_PRESET hidden
    # A generator expression: multi-configuration generators then add no Release/ folder.
    LIBRARY_OUTPUT_DIRECTORY "$<1:${build_dir}>"
    )
  install(TARGETS DeepRegisterAffineDescent
    LIBRARY DESTINATION "${install_dir}" COMPONENT RuntimeLibraries
    )
endfunction()
