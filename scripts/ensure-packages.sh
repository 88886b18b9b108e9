# Sourced by the scripts in this directory: installs the Debian/Ubuntu
# packages keyward needs when they are missing (as root, or with sudo), or
# stops with the exact command to run.

ensure_packages() {
  local missing=()
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local cmd="apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q ${missing[*]}"
  echo "keyward: installing ${missing[*]}" >&2
  if [ "$(id -u)" = 0 ]; then
    sh -c "$cmd" >&2
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo sh -c "$cmd" >&2
  else
    echo "keyward: missing packages; run: sudo sh -c '$cmd'" >&2
    exit 1
  fi
}

# What building and running the service needs (libtss2 for the TPM backend).
RUNTIME_PACKAGES=(softhsm2 openssl ca-certificates pkg-config libtss2-dev)
# What the test suite needs besides: independent PKCS#11, X.509 (Go's crypto/x509, pyca) and TPM tools, swtpm.
TEST_PACKAGES=(opensc postgresql-client p11-kit p11-kit-modules python3 python3-venv python3-cryptography golang-go swtpm swtpm-tools tpm2-tools chromium chromium-driver)

# pkilint (PyPI), the RFC 5280 linter the tests hold every certificate kind
# to, in a virtualenv of its own; its path is exported for the tests.
PKILINT_VERSION=0.13.3
ensure_pkilint() {
  local venv="${XDG_CACHE_HOME:-$HOME/.cache}/keyward/pkilint-$PKILINT_VERSION"
  if [ ! -x "$venv/bin/lint_pkix_cert" ]; then
    echo "keyward: installing pkilint $PKILINT_VERSION into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 && "$venv/bin/pip" install -q "pkilint==$PKILINT_VERSION" >&2 || {
      echo "keyward: could not install pkilint from PyPI" >&2
      exit 1
    }
  fi
  export KEYWARD_PKILINT="$venv/bin/lint_pkix_cert"
}

# opentelemetry-proto (PyPI), which decodes OTLP for the tests' trace
# receiver (tests/otlp_receiver.py), in a virtualenv of its own; its python
# is exported for the tests.
OTLP_PROTO_VERSION=1.45.2
ensure_otlp_proto() {
  local venv="${XDG_CACHE_HOME:-$HOME/.cache}/keyward/otlp-proto-$OTLP_PROTO_VERSION"
  if ! "$venv/bin/python" -c 'import opentelemetry.proto' >/dev/null 2>&1; then
    echo "keyward: installing opentelemetry-proto $OTLP_PROTO_VERSION into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 && "$venv/bin/pip" install -q "opentelemetry-proto==$OTLP_PROTO_VERSION" >&2 || {
      echo "keyward: could not install opentelemetry-proto from PyPI" >&2
      exit 1
    }
  fi
  export KEYWARD_OTLP_PYTHON="$venv/bin/python"
}
