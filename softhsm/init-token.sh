#!/usr/bin/env bash
# Creates a SoftHSM2 token for keyward outside the embedded default, e.g. to
# rehearse the production configuration (hsm-config/softhsm2.toml).
#
#   softhsm/init-token.sh DIR [LABEL]
#
# Writes DIR/softhsm2.conf and DIR/tokens/, initializes a token with random
# SO and user PINs, and stores the PINs in DIR/so.pin and DIR/user.pin (0600).
# Then: export SOFTHSM2_CONF=DIR/softhsm2.conf KEYWARD_PKCS11_PIN=$(cat DIR/user.pin)
set -euo pipefail
dir=${1:?usage: $0 DIR [LABEL]}
label=${2:-keyward}
umask 077
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
cat > "$dir/softhsm2.conf" <<CONF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
so=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
user=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
printf '%s' "$so" > "$dir/so.pin"
printf '%s' "$user" > "$dir/user.pin"
SOFTHSM2_CONF=$dir/softhsm2.conf softhsm2-util --init-token --free --label "$label" --so-pin "$so" --pin "$user" >/dev/null
echo "token '$label' in $dir; export SOFTHSM2_CONF=$dir/softhsm2.conf"
