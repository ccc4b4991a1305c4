# The serve e2e test's fixture: the pinned openai client installed with `npm ci` (exactly package-lock.json)
# into the build tree, once; again only when the lock file changed.
#   cmake -DSRC=<tests/serve/node> -DDST=<build dir> -DNPM=<npm> -P npm_ci.cmake
file(MAKE_DIRECTORY ${DST})
# The script runs from here, so that `import 'openai'` finds this node_modules.
configure_file(${SRC}/serve_e2e.mjs ${DST}/serve_e2e.mjs COPYONLY)
configure_file(${SRC}/load.mjs ${DST}/load.mjs COPYONLY)
configure_file(${SRC}/server.mjs ${DST}/server.mjs COPYONLY)
file(SHA256 ${SRC}/package-lock.json _want)
set(_stamp ${DST}/node_modules/.shardlm-lock-sha256)
if(EXISTS ${_stamp})
  file(READ ${_stamp} _have)
  if(_have STREQUAL _want)
    message(STATUS "openai client already installed in ${DST}")
    return()
  endif()
endif()
configure_file(${SRC}/package.json ${DST}/package.json COPYONLY)
configure_file(${SRC}/package-lock.json ${DST}/package-lock.json COPYONLY)
execute_process(COMMAND ${NPM} ci --no-audit --no-fund --loglevel=error WORKING_DIRECTORY ${DST}
                RESULT_VARIABLE _rc TIMEOUT 280)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "`npm ci` in ${DST} failed (${_rc}): the serve e2e test needs the openai package from the npm "
                      "registry (or a cache holding it)")
endif()
file(WRITE ${_stamp} ${_want})
