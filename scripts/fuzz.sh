#!/usr/bin/env bash
# Coverage-guided fuzzing of what parses untrusted bytes (cargo-fuzz, libFuzzer, AddressSanitizer).
#
#   bash scripts/fuzz.sh                 # every target for 10 s each (what the test command runs)
#   bash scripts/fuzz.sh 3600            # every target for an hour each
#   bash scripts/fuzz.sh 600 planner     # one target
#   FUZZ_JOBS=2 bash scripts/fuzz.sh ... # libFuzzer workers per target
#
# Each target starts from its checked-in seed corpus (fuzz/corpus/<target>, copied: a short run changes
# nothing in the tree) and replays every input that once failed (fuzz/regressions/<target>). A crash, a
# panic, a failed assertion, a run over 10 s or over 2 GB stops with the input saved under
# fuzz/artifacts/<target>/ and the command to replay it. Keep a long run's new inputs with
# FUZZ_KEEP=1 (they are added to fuzz/corpus/<target>; minimize with `cargo fuzz cmin <target>`).
#
# cargo-fuzz is installed from crates.io when missing. It needs a nightly compiler for -Zsanitizer: the
# nightly toolchain when rustup has one, else the stable compiler with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${1:-10}"
shift || true
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(frames startup scram planner config copy_rows)

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi

echo "== building the fuzz targets"
"${fuzz[@]}" build

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
  corpus="corpus/$t"
  if [ -z "${FUZZ_KEEP:-}" ]; then
    mkdir -p "$work/$t"
    cp -r "corpus/$t/." "$work/$t/"
    corpus="$work/$t"
  fi
  dirs=("$corpus")
  [ -d "regressions/$t" ] && dirs+=("regressions/$t")
  echo "== fuzzing $t for ${seconds}s"
  jobs=()
  # Several workers write their logs to fuzz-<n>.log in the working directory.
  [ "${FUZZ_JOBS:-1}" -gt 1 ] && jobs=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS")
  if ! "${fuzz[@]}" run "$t" "${dirs[@]}" -- -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
      -max_len=4096 -print_final_stats=1 "${jobs[@]}" > "$work/$t.log" 2>&1; then
    tail -n 60 "$work/$t.log"
    failed+=("$t")
  else
    # The last status line's coverage (edges, features, corpus), then the totals.
    grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$work/$t.log" | tail -n 1 | tr '\n' ' '
    grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$work/$t.log" | tr '\n' ' '
    echo
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzzing found failures in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
