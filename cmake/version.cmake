# Writes OUT (a header) with the project's version and the git commit the build is made from
# ("-dirty" when tracked files differ from it); the file changes only when they do, so a commit
# rebuilds one translation unit. Run at every build: cmake -DSRC=.. -DOUT=.. -DVERSION=.. -P this.
execute_process(COMMAND git -C "${SRC}" rev-parse --short=12 HEAD
                OUTPUT_VARIABLE commit OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
execute_process(COMMAND git -C "${SRC}" status --porcelain --untracked-files=no
                OUTPUT_VARIABLE dirty OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
if(NOT commit)
  set(commit "unknown")
elseif(dirty)
  string(APPEND commit "-dirty")
endif()
file(WRITE "${OUT}.tmp" "#pragma once\n#define GEMMA2_VERSION \"${VERSION}\"\n#define GEMMA2_GIT_COMMIT \"${commit}\"\n")
execute_process(COMMAND ${CMAKE_COMMAND} -E copy_if_different "${OUT}.tmp" "${OUT}")
file(REMOVE "${OUT}.tmp")
