#!/usr/bin/env bash
# Builds the binary from exactly what deploy/Dockerfile's build stage copies, the way
# `docker build` would see it, without Docker: the build machine has none, and an image
# whose context misses a file the manifest names (a bench, a SQL script) fails only there.
#
#   scripts/check-image-context.sh            release build of the copied context, offline
#
# It copies each `COPY <src>... <dest>` of the first stage (not `COPY --from=`) into an empty
# directory, drops what .dockerignore excludes, and runs the stage's cargo build there with
# --offline (the registry cache must hold the dependencies: run after any cargo build).
# Exit status: 0 if the context builds.
set -euo pipefail
cd "$(dirname "$0")/.."

context=$(mktemp -d "${TMPDIR:-/tmp}/usersync-image-XXXXXX")
trap 'rm -rf "$context"' EXIT

# The build stage: from the first FROM up to the second.
copies=$(awk '/^FROM /{n++} n==1 && /^COPY / && !/--from=/' deploy/Dockerfile)
[[ -n "$copies" ]] || { echo "check-image-context: no COPY in the build stage" >&2; exit 1; }
while read -r _ rest; do
  read -r -a words <<<"$rest"
  dest=${words[-1]}
  for src in "${words[@]:0:${#words[@]}-1}"; do
    [[ -e "$src" ]] || { echo "check-image-context: COPY names $src, which does not exist" >&2; exit 1; }
    case $dest in
      ./|.) cp -r "$src" "$context/" ;;
      */) mkdir -p "$context/$dest" && cp -r "$src" "$context/$dest" ;;
      *) mkdir -p "$context/$(dirname "$dest")" && cp -r "$src" "$context/$dest" ;;
    esac
  done
done <<<"$copies"

# What .dockerignore keeps out of the context never reaches the build either.
if [[ -f .dockerignore ]]; then
  shopt -s globstar nullglob dotglob
  while read -r pattern; do
    [[ -z "$pattern" || "$pattern" == \#* ]] && continue
    pattern=${pattern%/}
    (cd "$context" && for match in $pattern; do rm -rf -- "$match"; done)
  done <.dockerignore
fi

echo "check-image-context: building what deploy/Dockerfile copies: $(cd "$context" && ls | tr '\n' ' ')"
build=$(awk '/^FROM /{n++} n==1' deploy/Dockerfile | grep -o 'cargo build[^&\\]*' | head -1)
[[ -n "$build" ]] || { echo "check-image-context: no cargo build in the build stage" >&2; exit 1; }
(cd "$context" && CARGO_TARGET_DIR="$context/target" $build --offline)
echo "check-image-context: the image's build context builds ($build)"
