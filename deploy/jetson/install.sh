#!/usr/bin/env bash
# Install the edgecloud edge agent as a systemd service on a Jetson with JetPack 6.
#
#   sudo deploy/jetson/install.sh [--with-clocks] [--package SPEC]   install or upgrade (idempotent)
#   sudo deploy/jetson/install.sh --uninstall                         remove the service and the venv
#   deploy/jetson/install.sh --dry-run --prefix DIR                   render every file under DIR,
#                                                                     print the privileged commands
#
# The venv sees JetPack's system-wide TensorRT (--system-site-packages); TensorRT is never installed
# from PyPI (its wheels are another major version than JetPack's). Config in /etc/edge-agent and state
# in /var/lib/edge-agent survive upgrades and --uninstall.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SOURCE=$(cd "$HERE/../.." && pwd)
SERVICE_USER=edgeagent
UNIT=edge-agent.service
CLOCKS_UNIT=edge-agent-clocks.service

ACTION=install
PREFIX=""
DRY_RUN=0
WITH_CLOCKS=0
PACKAGE=""

usage() {
  sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'USAGE'
Options:
  --uninstall      disable and remove the units and /opt/edge-agent (keeps config, state, user)
  --with-clocks    also enable edge-agent-clocks.service (nvpmodel -m 0; jetson_clocks)
  --package SPEC   what pip installs (default: this source tree); the jetson extra is added
  --prefix DIR     install under DIR instead of / (unit paths are rewritten to match)
  --dry-run        skip the JetPack checks, user creation, venv, pip and systemctl: print them instead
  -h, --help       this text
USAGE
}

while [ $# -gt 0 ]; do
  case "$1" in
    --uninstall) ACTION=uninstall ;;
    --with-clocks) WITH_CLOCKS=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
    --prefix=*) PREFIX=${1#*=} ;;
    --package) PACKAGE=${2:?--package needs a pip requirement or path}; shift ;;
    --package=*) PACKAGE=${1#*=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if [ "$DRY_RUN" -eq 1 ] && [ -z "$PREFIX" ]; then
  echo "install.sh: --dry-run needs --prefix DIR (it still writes the files it renders)" >&2
  exit 2
fi
if [ -n "$PREFIX" ]; then
  mkdir -p "$PREFIX"
  PREFIX=$(cd "$PREFIX" && pwd)
fi
APP_DIR=/opt/edge-agent
CONF_DIR=/etc/edge-agent
STATE_DIR=/var/lib/edge-agent
UNIT_DIR=/etc/systemd/system
VENV=$PREFIX$APP_DIR/venv

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

# Run a privileged or system-changing command, or only show it in a dry run.
run() {
  if [ "$DRY_RUN" -eq 1 ]; then
    echo "+ $*"
  else
    "$@"
  fi
}

check_jetpack() {
  [ "$(id -u)" -eq 0 ] || die "run as root (sudo $0)"
  [ -r /etc/nv_tegra_release ] || die "/etc/nv_tegra_release is missing: this is not a Jetson with L4T"
  grep -q '^# R36' /etc/nv_tegra_release \
    || die "JetPack 6 (L4T R36) required; found: $(head -n 1 /etc/nv_tegra_release)"
  command -v python3 >/dev/null || die "python3 is missing"
  python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' \
    || die "Python 3.10 (JetPack 6's) required; found $(python3 --version 2>&1)"
  python3 -c 'import tensorrt' 2>/dev/null \
    || die "the system TensorRT does not import: sudo apt-get install nvidia-jetpack (or python3-libnvinfer)"
  python3 -c 'import sys, tensorrt; sys.exit(int(tensorrt.__version__.split(".")[0]) < 10)' \
    || die "TensorRT 10 required (JetPack 6.1 or later); found $(python3 -c 'import tensorrt; print(tensorrt.__version__)')"
  python3 -c 'import ensurepip' 2>/dev/null \
    || die "python3-venv is missing: sudo apt-get install python3-venv python3-dev"
}

create_user() {
  if id -u "$SERVICE_USER" >/dev/null 2>&1; then
    run usermod --append --groups video "$SERVICE_USER"
  else
    run useradd --system --user-group --groups video --home-dir "$STATE_DIR" --no-create-home \
      --shell /usr/sbin/nologin "$SERVICE_USER"
  fi
}

install_venv() {
  local spec=${PACKAGE:-$SOURCE}
  if [ ! -x "$VENV/bin/python" ]; then
    run python3 -m venv --system-site-packages "$VENV"
  fi
  # pycuda compiles against CUDA on aarch64; JetPack's TensorRT bindings want NumPy 1.x.
  local constraints="$PREFIX$APP_DIR/constraints.txt"
  printf 'numpy<2\n' > "$constraints"
  PATH=/usr/local/cuda/bin:$PATH CUDA_ROOT=/usr/local/cuda \
    run "$VENV/bin/python" -m pip install --upgrade --constraint "$constraints" "${spec}[jetson]"
  run "$VENV/bin/python" -c 'import tensorrt, pycuda.driver, edgecloud'
}

# install_file SRC DEST MODE [OWNER:GROUP]: ownership only where the user exists (not in a dry run).
install_file() {
  local src=$1 dest=$2 mode=$3 owner=${4:-}
  mkdir -p "$(dirname "$dest")"
  if [ -n "$owner" ] && [ "$DRY_RUN" -eq 0 ]; then
    install -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$src" "$dest"
  else
    install -m "$mode" "$src" "$dest"
  fi
}

# The units name /opt/edge-agent and /etc/edge-agent; under a prefix they must point into it.
render_unit() {
  local src=$1 dest=$2
  mkdir -p "$(dirname "$dest")"
  sed -e "s#/opt/edge-agent/#$PREFIX$APP_DIR/#g" -e "s#/etc/edge-agent/#$PREFIX$CONF_DIR/#g" \
    "$src" > "$dest.tmp"
  chmod 0644 "$dest.tmp"
  mv "$dest.tmp" "$dest"
}

do_install() {
  if [ "$DRY_RUN" -eq 1 ]; then
    say "dry run into ${PREFIX:-/}: JetPack checks, user, venv, pip and systemctl are only printed"
  else
    check_jetpack
  fi
  create_user
  mkdir -p "$PREFIX$APP_DIR"
  install_venv

  if [ -e "$PREFIX$CONF_DIR/agent.toml" ]; then
    say "keeping the existing $CONF_DIR/agent.toml"
  else
    install_file "$HERE/agent.toml" "$PREFIX$CONF_DIR/agent.toml" 0640 "root:$SERVICE_USER"
    say "installed $CONF_DIR/agent.toml: set device_id, the model path and the cloud before starting"
  fi
  mkdir -p "$PREFIX$STATE_DIR/models"
  if [ "$DRY_RUN" -eq 0 ]; then
    chown -R "$SERVICE_USER:$SERVICE_USER" "$PREFIX$STATE_DIR"
    chmod 0750 "$PREFIX$STATE_DIR"
  fi

  render_unit "$HERE/$UNIT" "$PREFIX$UNIT_DIR/$UNIT"
  render_unit "$HERE/$CLOCKS_UNIT" "$PREFIX$UNIT_DIR/$CLOCKS_UNIT"
  run systemctl daemon-reload
  run systemctl enable "$UNIT"
  if [ "$WITH_CLOCKS" -eq 1 ]; then
    run systemctl enable "$CLOCKS_UNIT"
  fi
  say "installed. Put the engine (and its .meta.json) under $STATE_DIR/models, then: systemctl start $UNIT"
}

do_uninstall() {
  [ "$DRY_RUN" -eq 1 ] || [ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 --uninstall)"
  run systemctl disable --now "$UNIT" "$CLOCKS_UNIT" || true
  rm -f "$PREFIX$UNIT_DIR/$UNIT" "$PREFIX$UNIT_DIR/$CLOCKS_UNIT"
  run systemctl daemon-reload
  rm -rf "$PREFIX$APP_DIR"
  say "removed the service and $APP_DIR; kept $CONF_DIR, $STATE_DIR and the $SERVICE_USER user" \
    "(remove them by hand to purge)"
}

case "$ACTION" in
  install) do_install ;;
  uninstall) do_uninstall ;;
esac
