#!/usr/bin/env bash
# Sigil's images without Docker, from the one description in images/images.conf.
#
#   hack/images.sh build [OPTS] [NAME...]   OCI layout tars in $SIGIL_CACHE/images (default:
#                                     all); release images run `cargo build --release` first
#   hack/images.sh import [OPTS] [NAME...]  build, then import into the real node's containerd
#   hack/images.sh all [OPTS]        build every image; import them when the node is up
#     --bin-dir DIR   take the Sigil binaries from DIR instead of building the release
#                     profile (the real-node tests pass the debug binaries `cargo test`
#                     built: same images, same entrypoints, paths, users and libraries;
#                     their debug info is stripped, symbols kept)
#     --out DIR       write the tars to DIR instead of $SIGIL_CACHE/images
#   hack/images.sh helm-args         the `helm install` flags that select these images
#   hack/images.sh dockerfile        print the Dockerfile images.conf describes
#   hack/images.sh check             fail if ./Dockerfile differs from that
#
# Images are named $TEST_IMAGE_PREFIX/NAME:$TEST_IMAGE_TAG (fully qualified: the CRI
# would turn local/x into docker.io/local/x). docs/real-node.md tells how the local base
# differs from distroless.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=hack/versions.sh
. "$here/hack/versions.sh"
CONF=$here/images/images.conf
OUT=$SIGIL_CACHE/images
TARGET_DIR=${CARGO_TARGET_DIR:-$here/target}
# The Sigil binaries: the release profile's (built here), or --bin-dir's (taken as they are).
BIN_DIR=
CARGO=${CARGO:-cargo}
LIBDIR=/usr/lib/x86_64-linux-gnu
PATH_ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
SSL_ENV=SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# The applets the test pods use (busybox lines).
APPLETS="sh ash cat ls sleep echo test [ grep sed awk head tail wc mkdir rm cp mv ln stat find
  sha256sum md5sum date env id ps kill mount umount timeout true false printf readlink tr cut
  sort uniq diff xargs hostname nslookup wget nc touch chmod watch tee base64 dd df du which"

log() { printf '[images] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# images.conf, one image at a time: `conf_images [release|test|bench]` lists names;
# `conf_lines NAME` prints that image's instructions.
# With no kind: the release and test images (what the real-node tests import); bench
# images (SPIRE's) only when named.
conf_images() {
  awk -v want="${1:-}" '$1 == "image" && (want == "" ? $3 != "bench" : $3 == want) {print $2}' "$CONF"
}
conf_lines() {
  awk -v name="$1" '
    /^[[:space:]]*(#|$)/ {next}
    $1 == "image" {cur = $2; next}
    cur == name {print}' "$CONF"
}
conf_kind() { awk -v name="$1" '$1 == "image" && $2 == name {print $3}' "$CONF"; }

# ---------------------------------------------------------------- the Dockerfile
dockerfile() {
  local bins libs name
  bins=$(for name in $(conf_images release); do conf_lines "$name"; done | awk '$1 == "bin" {print $2}' | sort -u)
  libs=$(for name in $(conf_images release); do conf_lines "$name"; done | awk '$1 == "lib" {print $2}' | sort -u)
  cat <<'EOF'
# syntax=docker/dockerfile:1
# GENERATED from images/images.conf by `hack/images.sh dockerfile`: edit that file, then
# regenerate. The real-node tests build the same images without Docker from the same
# description (hack/images.sh), and `hack/images.sh check` fails when the two differ.
#
# The three Sigil images from one build:
#   docker build --target sigil-operator -t sigil-operator .
#   docker build --target sigil-agent    -t sigil-agent .
#   docker build --target sigil-csi      -t sigil-csi .

FROM docker.io/library/rust:1.95-bookworm AS build
# The agent's TPM helper links the tss2 libraries (TPM node attestation, tss-esapi).
RUN apt-get update && apt-get install -y --no-install-recommends libtss2-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
EOF
  printf 'RUN --mount=type=cache,target=/usr/local/cargo/registry \\\n'
  printf '    --mount=type=cache,target=/src/target \\\n'
  printf '    cargo build --release --locked --bins \\\n'
  printf ' && mkdir -p /out/lib \\\n'
  printf ' && cp%s /out/ \\\n' "$(for b in $bins; do printf ' target/release/%s' "$b"; done)"
  printf ' && cp -L%s /out/lib/\n' "$(for l in $libs; do printf ' /usr/lib/*-linux-gnu/%s' "$l"; done)"
  for name in $(conf_images release); do
    echo
    conf_comment "$name"
    local base user="" entry=""
    base=$(conf_lines "$name" | awk '$1 == "base" {print $2}')
    case $base in
      cc) echo "FROM gcr.io/distroless/cc-debian12 AS $name" ;;
      cc-nonroot) echo "FROM gcr.io/distroless/cc-debian12:nonroot AS $name" ;;
      scratch) echo "FROM scratch AS $name" ;;
      *) die "$name: unknown base $base" ;;
    esac
    while read -r op a b; do
      case $op in
        lib) echo "COPY --from=build /out/lib/$a $b/" ;;
        bin) echo "COPY --from=build /out/$a $b" ;;
        user) user=$a ;;
        entrypoint) entry=$(json_array $a $b) ;;
        base) ;;
        *) die "$name: $op is not allowed in a release image" ;;
      esac
    done < <(conf_lines "$name")
    [ -z "$user" ] || echo "USER $user"
    [ -z "$entry" ] || echo "ENTRYPOINT $entry"
  done
}

# The comment block right above an image's `image` line.
conf_comment() {
  awk -v name="$1" '
    /^#/ {buf = buf $0 "\n"; next}
    $1 == "image" && $2 == name {printf "%s", buf; exit}
    {buf = ""}' "$CONF"
}

json_array() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "$@"; }

check() {
  if ! diff -u "$here/Dockerfile" <(dockerfile) >&2; then
    die "Dockerfile differs from images/images.conf: run hack/images.sh dockerfile >Dockerfile"
  fi
}

# ---------------------------------------------------------------- local builds
# The distroless/cc-debian12 equivalent, from this machine's Debian 12.
base_cc() { # dir
  local d=$1 f
  mkdir -p "$d"/{etc/ssl/certs,tmp,root,home/nonroot,usr/lib/x86_64-linux-gnu,usr/lib64,usr/bin,var/lib}
  ln -sfn usr/lib "$d/lib"; ln -sfn usr/lib64 "$d/lib64"; ln -sfn usr/bin "$d/bin"; ln -sfn usr/sbin "$d/sbin"
  mkdir -p "$d/usr/sbin"
  chmod 1777 "$d/tmp"; chmod 700 "$d/root" "$d/home/nonroot"
  cat >"$d/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$d/etc/group" <<'EOF'
root:x:0:
tty:x:5:
staff:x:50:
nobody:x:65534:
nonroot:x:65532:
EOF
  echo "hosts: files dns" >"$d/etc/nsswitch.conf"
  cp /etc/os-release "$d/etc/os-release"
  cp -L /etc/ssl/certs/ca-certificates.crt "$d/etc/ssl/certs/ca-certificates.crt"
  # glibc (libc6), libgcc-s1, libstdc++6, libgomp1, libssl3: what distroless cc carries.
  for f in ld-linux-x86-64.so.2 libc.so.6 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 \
    libresolv.so.2 libnss_files.so.2 libnss_dns.so.2 libutil.so.1 libanl.so.1 \
    libgcc_s.so.1 libstdc++.so.6 libgomp.so.1 libssl.so.3 libcrypto.so.3; do
    cp -L "$LIBDIR/$f" "$d/usr/lib/x86_64-linux-gnu/$f"
  done
  ln -sfn ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$d/usr/lib64/ld-linux-x86-64.so.2"
}

# Every binary and library in the rootfs finds its libraries inside it.
check_libs() { # rootfs image
  local root=$1 f lib missing=0
  while read -r f; do
    file -b "$f" | grep -q 'dynamically linked' || continue
    while read -r lib; do
      [ -e "$root/usr/lib/x86_64-linux-gnu/$lib" ] || { log "$2: $f needs $lib, not in the image"; missing=1; }
    done < <(objdump -p "$f" 2>/dev/null | awk '$1 == "NEEDED" {print $2}')
  done < <(find "$root" -type f \( -perm -u+x -o -name '*.so*' \))
  return $missing
}

# The binaries every `bin` line of these images names.
bin_names() { # image...
  local n
  for n in "$@"; do conf_lines "$n"; done | awk '$1 == "bin" {print $2}' | sort -u
}

release_bins() {
  local need=0 b
  if [ -n "$BIN_DIR" ]; then
    for b in $(bin_names $(conf_images)); do
      [ -x "$BIN_DIR/$b" ] || die "--bin-dir $BIN_DIR has no executable $b: build it first (cargo test --workspace --no-run builds every binary)"
    done
    return 0
  fi
  for b in $(bin_names $(conf_images)); do
    [ -x "$TARGET_DIR/release/$b" ] || need=1
  done
  if [ "${SIGIL_IMAGES_NO_CARGO:-}" = 1 ] && [ $need = 0 ]; then return 0; fi
  log "cargo build --release --locked --bins (target dir $TARGET_DIR)"
  bash "$here/hack/test-tools.sh" swtpm # Debian's libtss2 + pkg-config, which the agent's TPM helper links
  (cd "$here" && CARGO_TARGET_DIR=$TARGET_DIR $CARGO build --release --locked --bins)
}

image_name() { echo "$TEST_IMAGE_PREFIX/$1:$TEST_IMAGE_TAG"; }

build_one() { # name
  local name=$1 work base user="" entry="[]" busybox_dest="" owners=()
  work=$OUT/work/$name
  rm -rf "$work"; mkdir -p "$work/base" "$work/app"
  base=$(conf_lines "$name" | awk '$1 == "base" {print $2}')
  case $base in
    cc) base_cc "$work/base" ;;
    cc-nonroot) base_cc "$work/base"; user=65532:65532 ;;
    scratch) ;;
    *) die "$name: unknown base $base" ;;
  esac
  [ "$base" = scratch ] || owners+=(--owner home/nonroot=65532:65532)
  local app=$work/app
  while read -r op a b rest; do
    case $op in
      base) ;;
      bin)
        if [ -n "$BIN_DIR" ]; then
          # A debug build's binary without its debug info (symbols stay, as in release).
          mkdir -p "$(dirname "$app$b")"
          objcopy --strip-debug "$BIN_DIR/$a" "$app$b"; chmod 755 "$app$b"
        else
          install -D -m 755 "$TARGET_DIR/release/$a" "$app$b"
        fi ;;
      lib) install -D -m 644 "$(readlink -f "$LIBDIR/$a")" "$app$b/$a" ;;
      tool) install -D -m 755 "$SIGIL_BIN/static/$a" "$app$b" ;;
      host) install -D -m 755 "$a" "$app$b"; [[ $a == */busybox ]] && busybox_dest=$b ;;
      deb) install -D -m 755 "$SIGIL_CACHE/debian/$a" "$app$b" ;;
      dir) mkdir -p "$app$a"; chmod 1777 "$app$a" ;;
      busybox)
        [ -n "$busybox_dest" ] || die "$name: busybox before its host line"
        mkdir -p "$app$a"
        for x in $APPLETS; do [ -e "$app$a/$x" ] || ln -s "$busybox_dest" "$app$a/$x"; done ;;
      user) user=$a ;;
      entrypoint) entry=$(json_array $a $b $rest) ;;
      *) die "$name: unknown instruction $op" ;;
    esac
  done < <(conf_lines "$name")
  # One view of the whole filesystem, to check that every library is there.
  mkdir -p "$work/all"; cp -a "$work/base/." "$work/app/." "$work/all/"
  check_libs "$work/all" "$name" || die "$name: libraries missing (images.conf)"
  local config layers=()
  config=$(python3 -c 'import json,sys
c = {"Entrypoint": json.loads(sys.argv[1]), "Env": sys.argv[3:], "WorkingDir": "/"}
if sys.argv[2]: c["User"] = sys.argv[2]
print(json.dumps(c))' "$entry" "$user" "$PATH_ENV" "$SSL_ENV")
  [ "$base" = scratch ] || layers+=(--layer "$work/base")
  layers+=(--layer "$work/app")
  mkdir -p "$OUT"
  python3 "$here/hack/oci-image.py" --out "$OUT/$name.tar" --name "$(image_name "$name")" \
    "${layers[@]}" "${owners[@]}" --config "$config" >/dev/null
  rm -rf "$work"
  log "$(image_name "$name") -> $OUT/$name.tar ($(du -h "$OUT/$name.tar" | cut -f1))"
}

build() {
  local names=("$@") n release=0
  [ ${#names[@]} -gt 0 ] || mapfile -t names < <(conf_images)
  for n in "${names[@]}"; do
    [ -n "$(conf_kind "$n")" ] || die "unknown image $n (images.conf has: $(conf_images | tr '\n' ' '))"
    [ -n "$(bin_names "$n")" ] && release=1
  done
  check
  if [ $release = 1 ]; then release_bins; fi
  if [ ! -x "$SIGIL_BIN/static/pause" ] || [ ! -x "$SIGIL_BIN/static/node-registrar" ] ||
    [ ! -x "$SIGIL_BIN/static/go-spiffe-client" ] || [ ! -x /bin/busybox ] ||
    [ ! -x "$SIGIL_CACHE/debian/nginx/usr/sbin/nginx" ]; then
    bash "$here/hack/test-tools.sh" node-helpers debian-node
  fi
  for n in "${names[@]}"; do
    if [ "$(conf_kind "$n")" = bench ]; then bash "$here/hack/test-tools.sh" spire-node; break; fi
  done
  for n in "${names[@]}"; do build_one "$n"; done
  rm -rf "$OUT/work"
}

SOCK=/run/sigil-cluster/containerd/containerd.sock
import() {
  local sock=$SOCK n names=("$@")
  [ -S "$sock" ] || die "no cluster: run make cluster first"
  [ ${#names[@]} -gt 0 ] || mapfile -t names < <(conf_images)
  build "${names[@]}"
  for n in "${names[@]}"; do
    "$SIGIL_BIN/ctr" --address "$sock" -n k8s.io images import "$OUT/$n.tar" 2>&1 >/dev/null | { grep -v DEPRECATION >&2 || true; }
    log "imported $(image_name "$n")"
  done
}

helm_args() {
  echo "--set image.repository=$TEST_IMAGE_PREFIX --set image.tag=$TEST_IMAGE_TAG" \
    "--set csi.registrar.image=$(image_name node-registrar)"
}

cmd=${1:-}; [ $# = 0 ] || shift
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --bin-dir) BIN_DIR=$(realpath "${2:?--bin-dir DIR}"); shift 2 ;;
    --out) OUT=$(realpath -m "${2:?--out DIR}"); shift 2 ;;
    -*) die "unknown option $1" ;;
    *) args+=("$1"); shift ;;
  esac
done
case $cmd in
  build) build "${args[@]}" ;;
  import) import "${args[@]}" ;;
  all) if [ -S "$SOCK" ]; then import "${args[@]}"; else build "${args[@]}"; fi ;;
  helm-args) helm_args ;;
  dockerfile) dockerfile ;;
  check) check ;;
  *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
