# Sourced (not run) by the shell scripts in benchmarks/, from the repository root, with $PY set to the
# interpreter: makes `import xlp.kernels`, `xlp.xlstm_model`, `xlp.pipeline`, `xlp.tokenizer`, `xlp.configs`
# find THIS repository's code, and sets XLP_SOURCE to a line saying how.
#
# Where xlp.* already resolves to this checkout (the project installed from it, `make install`), that is
# used as it is. Elsewhere (a bare GPU machine with only torch and triton and a copy of the repository, or an
# install of another checkout), it builds a temporary folder holding xlp/ with one symlink per package folder
# (xlp/kernels -> REPO/kernels, ...; no xlp/__init__.py: xlp is a namespace package), puts that folder first
# on PYTHONPATH and removes it when the script exits (an EXIT trap: a script that sources this sets none).
# Never the repository root itself: its kernels/ folder would shadow Hugging Face's `kernels`.
xlp_repo=$(pwd -P)
# find_spec locates xlp.kernels without running it (no torch import): where it is, not whether it loads.
if "$PY" -c 'import importlib.util, os, sys
s = importlib.util.find_spec("xlp.kernels")
sys.exit(s is None or os.path.realpath(list(s.submodule_search_locations)[0]) != os.path.realpath(sys.argv[1]))' \
    "$xlp_repo/kernels" 2>/dev/null; then
  XLP_SOURCE="xlp: $xlp_repo, importable as it is"
else
  XLP_SHIM=$(mktemp -d "${TMPDIR:-/tmp}/xlp-shim.XXXXXX") || exit 2
  trap 'rm -rf "$XLP_SHIM"' EXIT
  mkdir "$XLP_SHIM/xlp"
  for xlp_pkg in kernels xlstm_model pipeline tokenizer configs slurm; do
    ln -s "$xlp_repo/$xlp_pkg" "$XLP_SHIM/xlp/$xlp_pkg"
  done
  export PYTHONPATH="$XLP_SHIM${PYTHONPATH:+:$PYTHONPATH}"
  XLP_SOURCE="xlp: $xlp_repo through an import shim on PYTHONPATH (the project is not installed from here)"
fi
unset xlp_repo xlp_pkg
