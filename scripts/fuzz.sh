#!/usr/bin/env bash
# Fuzzes the parsers and decoders that read outside input (fuzz/, cargo-fuzz + libFuzzer):
# builds every target and runs each for SECONDS (default 30) from the committed corpus, then
# fails if any target crashed, hung or ran out of memory (the input is kept in
# fuzz/artifacts/<target>/). Needs only the stable toolchain (RUSTC_BOOTSTRAP=1 unlocks the
# sanitizer flags cargo-fuzz passes), a C++ compiler (libFuzzer is built from source), and
# crates.io for `cargo install cargo-fuzz` the first time.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# New inputs found go to a temporary directory, not into fuzz/corpus/ (see fuzz/README.md to
# grow the corpus).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-30}
shift || true
step() { printf '==> %s\n' "$*" >&2; }
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  step "installing cargo-fuzz (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi

# Longest input per target; dictionary per target.
max_len() {
  case $1 in
    condition | template | changelog) echo 4096 ;;
    *) echo 8192 ;;
  esac
}
dict() {
  case $1 in
    nats | redis | changelog) echo dicts/json.dict ;;
    *) echo "dicts/$1.dict" ;;
  esac
}

if [ $# -gt 0 ]; then
  targets=("$@")
else
  # shellcheck disable=SC2207 # target names have no spaces
  targets=($(cargo fuzz list))
fi
step "building ${#targets[@]} fuzz targets"
cargo fuzz build

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
  step "$t: ${seconds}s"
  mkdir -p "$scratch/$t" "corpus/$t"
  args=(-max_total_time="$seconds" -max_len="$(max_len "$t")" -rss_limit_mb=2048 -timeout=10
        -print_final_stats=1)
  [ -f "$(dict "$t")" ] && args+=(-dict="$(dict "$t")")
  if cargo fuzz run "$t" "$scratch/$t" "corpus/$t" -- "${args[@]}" >"$scratch/$t.log" 2>&1; then
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec)|^#[0-9]+[[:space:]]+DONE' "$scratch/$t.log" >&2 || true
  else
    tail -n 60 "$scratch/$t.log" >&2
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  step "FAILED: ${failed[*]} (inputs in fuzz/artifacts/; reproduce with: RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/FILE)"
  exit 1
fi
step "no crash in ${#targets[@]} targets"
