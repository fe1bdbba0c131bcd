#!/usr/bin/env bash
# The Python package's tests: builds the wheel once with maturin into the cargo target folder
# the Rust tests used (so the compiled dependencies are reused), installs it into
# target/python-venv with pytest, and runs python/tests. `.ci/run` calls it after the Rust
# tests; README's test command runs both.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="$root/target/python-venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" 2>/dev/null || {
        # Debian without python3-venv: virtualenv from PyPI builds it instead.
        python3 -m pip install --user --quiet --disable-pip-version-check virtualenv
        python3 -m virtualenv --quiet "$venv"
    }
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r python/requirements-test.txt
rm -rf target/wheels
# --release and the workspace's target folder: the same profile and artifacts as `cargo test
# --release`, so only the package's own crate and pyo3 are compiled here.
"$venv/bin/maturin" build --release --manifest-path python/Cargo.toml --out target/wheels --interpreter "$venv/bin/python"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps target/wheels/clipft-*.whl
# The tests also need the `clipft` binary (the CLI's embeddings, a trainer to talk to).
cargo build --release --bin clipft
# From the repository root: run from python/, `import clipft` would find the sources without
# their compiled part.
CLIPFT_BIN="$root/target/release/clipft" CLIPFT_REPO="$root" "$venv/bin/python" -m pytest -q python/tests "$@"
