#!/usr/bin/env bash
# Runs the end-to-end suite (tests/it) for pairs of PostgreSQL versions, source → target, and
# prints a table of the results.
#
#   scripts/compat-matrix.sh                      every version as source against target 15,
#                                                 and every version as target against source 15
#   scripts/compat-matrix.sh --all-pairs          every source × every target
#   scripts/compat-matrix.sh --pairs "17:14 14:18" -- replication::
#                                                 chosen pairs; after --, `cargo test` test
#                                                 filters and options (e.g. a module, --exact)
#
# Environment: COMPAT_VERSIONS (default "14 15 16 17 18"), COMPAT_DEFAULT (default 15, the
# version the other role runs), COMPAT_LOG_DIR (default: a new temp dir; one log per pair).
# The binaries come from scripts/fetch-postgres.sh (npm registry, cached); every version,
# the default included, is a fetched build, so a pair differs only in what it names.
# Exit status: 0 if every pair passed.
set -euo pipefail
cd "$(dirname "$0")/.."

versions=(${COMPAT_VERSIONS:-14 15 16 17 18})
default=${COMPAT_DEFAULT:-15}
pairs=()
all_pairs=false
while [[ $# -gt 0 ]]; do
  case $1 in
    --all-pairs) all_pairs=true ;;
    --pairs)
      [[ $# -ge 2 ]] || { echo "compat-matrix: --pairs needs a list such as \"17:14 14:18\"" >&2; exit 2; }
      read -r -a pairs <<<"$2"
      shift
      ;;
    --) shift; break ;;
    *) echo "compat-matrix: unknown argument $1 (see the comment at the top)" >&2; exit 2 ;;
  esac
  shift
done
test_args=("$@")

if [[ ${#pairs[@]} -eq 0 ]]; then
  if $all_pairs; then
    for s in "${versions[@]}"; do for t in "${versions[@]}"; do pairs+=("$s:$t"); done; done
  else
    for v in "${versions[@]}"; do pairs+=("$v:$default"); done
    for v in "${versions[@]}"; do [[ $v == "$default" ]] || pairs+=("$default:$v"); done
  fi
fi

# Fetch every version the pairs name (fails loudly: a matrix without its servers is no result).
declare -A bin
needed=$(printf '%s\n' "${pairs[@]}" | tr ':' '\n' | sort -un)
for major in $needed; do
  bin[$major]=$(scripts/fetch-postgres.sh "$major")
done

log_dir=${COMPAT_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/usersync-compat-XXXXXX")}
mkdir -p "$log_dir"
export CARGO_TERM_COLOR=never
cargo test --locked --test it --no-run >"$log_dir/build.log" 2>&1 || {
  cat "$log_dir/build.log" >&2
  echo "compat-matrix: the test build failed" >&2
  exit 1
}

results=()
failed=0
for pair in "${pairs[@]}"; do
  source_major=${pair%%:*} target_major=${pair##*:}
  log=$log_dir/source-$source_major-target-$target_major.log
  echo "compat-matrix: source $source_major → target $target_major (log: $log)" >&2
  start=$SECONDS
  status=pass
  USERSYNC_TEST_SOURCE_PG_BIN=${bin[$source_major]} \
    USERSYNC_TEST_TARGET_PG_BIN=${bin[$target_major]} \
    cargo test --locked --test it -- "${test_args[@]}" >"$log" 2>&1 || status=FAIL
  # The "test result:" line: "ok. 60 passed; 0 failed; 1 ignored; ..."
  counts=$(grep -o '[0-9]* passed; [0-9]* failed; [0-9]* ignored' "$log" | tail -1 || true)
  [[ -n $counts ]] || counts="no test result (see the log)"
  [[ $status == pass ]] || failed=$((failed + 1))
  results+=("$(printf '%-8s %-8s %-5s %-36s %4ss' "$source_major" "$target_major" "$status" "$counts" $((SECONDS - start)))")
  if [[ $status != pass ]]; then
    grep -E '^test .* FAILED$|^    [a-z_:]+$' "$log" | sed 's/^/  /' >&2 || true
  fi
done

printf '\n%-8s %-8s %-5s %-36s %5s\n' source target result tests time
for line in "${results[@]}"; do echo "$line"; done
echo "logs: $log_dir"
[[ $failed -eq 0 ]] || { echo "compat-matrix: $failed of ${#pairs[@]} pairs failed" >&2; exit 1; }
