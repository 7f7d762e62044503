# The data folders kept at the top level of the source tree (model packages, templates, the demo
# case, third-party licences), copied next to the module at configure time:
# <qt-scripted-modules>/Resources/<name>, where NormativeAnomalyLib.resources looks for them.
# The build tree then holds them too (Slicer's ctest and a developer build run the module from
# there), and the scripted-module macro installs that whole folder with the module.
set(NORMATIVE_ANOMALY_SHARED_RESOURCE_DIRS
  Models
  Templates
  SampleData
  Licenses
  )
# The finished run the self-test loads without PyTorch (Testing/Data/<name> -> Resources/TestData/<name>).
set(NORMATIVE_ANOMALY_TEST_DATA_DIRS
  demo_run
  )

# Copies the FOLDERS of SOURCE_DIR into DESTINATION_DIR; sets OUT_FILES (in the caller's scope) to
# the source files copied, so that the caller can re-run the copy when one of them changes.
function(normative_anomaly_copy_folders SOURCE_DIR DESTINATION_DIR OUT_FILES)
  set(_copied)
  foreach(_dir IN LISTS ARGN)
    if(NOT IS_DIRECTORY "${SOURCE_DIR}/${_dir}")
      message(FATAL_ERROR "NormativeAnomaly: ${SOURCE_DIR}/${_dir} not found; the module cannot run without it")
    endif()
    file(COPY "${SOURCE_DIR}/${_dir}" DESTINATION "${DESTINATION_DIR}")
    file(GLOB_RECURSE _files LIST_DIRECTORIES false "${SOURCE_DIR}/${_dir}/*")
    list(APPEND _copied ${_files})
  endforeach()
  set(${OUT_FILES} ${_copied} PARENT_SCOPE)
endfunction()
