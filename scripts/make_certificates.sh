#!/usr/bin/env bash
# Credentials for a Flower deployment of fedasr: TLS between SuperNodes and the SuperLink, and the key pairs that
# authenticate SuperNodes (Flower 1.42: SuperLink started with --enable-supernode-auth, each SuperNode's public
# key registered with `flwr supernode register`, its private key given to `flower-supernode
# --auth-supernode-private-key`).
#
#   scripts/make_certificates.sh OUT_DIR [HOST...] [--supernodes N] [--days D] [--force]
#
# Writes into OUT_DIR:
#   ca.crt, ca.key                 a private certificate authority (ca.crt goes to every SuperNode and flwr user)
#   server.pem, server.key         the SuperLink's certificate (SAN: 127.0.0.1, localhost and every HOST given)
#   supernodes/supernode-I, supernode-I.pub   (I = 0..N-1) ECDSA P-384 key pairs in OpenSSH format
# Idempotent: files that exist are kept (a second run changes nothing); --force makes everything anew. Asking
# for other HOSTs than the existing server certificate holds is an error (it would need --force). Private keys
# are 0600. Each file is written to a temporary name and renamed, so a killed run never leaves half a file.
set -euo pipefail

usage() { echo "usage: $0 OUT_DIR [HOST...] [--supernodes N] [--days D] [--force]" >&2; exit 2; }

OUT="" HOSTS=() SUPERNODES=2 DAYS=365 FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --force) FORCE=1 ;;
    --supernodes) [ $# -ge 2 ] || usage; SUPERNODES=$2; shift ;;
    --days) [ $# -ge 2 ] || usage; DAYS=$2; shift ;;
    -h|--help) sed -n 2,16p "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) if [ -z "$OUT" ]; then OUT=$1; else HOSTS+=("$1"); fi ;;
  esac
  shift
done
[ -n "$OUT" ] || usage
case "$SUPERNODES" in ''|*[!0-9]*) echo "--supernodes takes a number, got '$SUPERNODES'" >&2; exit 2 ;; esac
command -v openssl >/dev/null || { echo "openssl not found: install it (Debian: apt-get install openssl)" >&2; exit 1; }

umask 077
mkdir -p "$OUT/supernodes"
WORK=$(mktemp -d "$OUT/.tmp.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [ "$FORCE" = 1 ]; then
  rm -f "$OUT"/ca.crt "$OUT"/ca.key "$OUT"/ca.srl "$OUT"/server.pem "$OUT"/server.key "$OUT"/server.san \
        "$OUT"/supernodes/supernode-*
fi

# Subject alternative names of the SuperLink certificate: loopback always, then the hosts given.
SAN="IP:127.0.0.1,DNS:localhost"
for host in ${HOSTS[@]+"${HOSTS[@]}"}; do
  if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then SAN="$SAN,IP:$host"; else SAN="$SAN,DNS:$host"; fi
done

publish() {  # publish TMP_FILE FINAL_PATH MODE: atomic rename into place
  chmod "$3" "$1"
  mv -f "$1" "$2"
}

made_ca=0
if [ ! -f "$OUT/ca.key" ] || [ ! -f "$OUT/ca.crt" ]; then
  openssl ecparam -name secp384r1 -genkey -noout -out "$WORK/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$WORK/ca.key" -sha384 -days "$DAYS" -subj "/CN=fedasr deployment CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$WORK/ca.crt"
  publish "$WORK/ca.key" "$OUT/ca.key" 600
  publish "$WORK/ca.crt" "$OUT/ca.crt" 644
  made_ca=1
  echo "made $OUT/ca.crt"
fi

if [ -f "$OUT/server.pem" ] && [ "$made_ca" = 0 ]; then
  if [ "$(cat "$OUT/server.san" 2>/dev/null)" != "$SAN" ]; then
    echo "$OUT/server.pem was made for '$(cat "$OUT/server.san" 2>/dev/null)', not '$SAN': run again with --force" \
         "to remake all credentials for the new hosts (then re-register the SuperNodes' keys)" >&2
    exit 1
  fi
else
  openssl ecparam -name secp384r1 -genkey -noout -out "$WORK/server.key" 2>/dev/null
  openssl req -new -key "$WORK/server.key" -subj "/CN=fedasr SuperLink" -out "$WORK/server.csr"
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=%s\nextendedKeyUsage=serverAuth\n' \
    "$SAN" "digitalSignature,keyEncipherment" > "$WORK/server.ext"
  openssl x509 -req -in "$WORK/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
    -CAserial "$WORK/ca.srl" -days "$DAYS" -sha384 -extfile "$WORK/server.ext" -out "$WORK/server.pem" 2>/dev/null
  echo "$SAN" > "$WORK/server.san"
  publish "$WORK/server.key" "$OUT/server.key" 600
  publish "$WORK/server.san" "$OUT/server.san" 644
  publish "$WORK/server.pem" "$OUT/server.pem" 644
  echo "made $OUT/server.pem ($SAN)"
fi

make_keypair() {  # make_keypair PATH COMMENT: OpenSSH ECDSA P-384, the format flower-supernode reads
  if command -v ssh-keygen >/dev/null; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$2" -f "$1"
  else  # no OpenSSH client: the same format written by `cryptography`, which Flower itself depends on
    "${PYTHON:-python3}" - "$1" "$2" <<'PY'
import sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP384R1())
open(sys.argv[1], "wb").write(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
public = key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
open(sys.argv[1] + ".pub", "wb").write(public + b" " + sys.argv[2].encode() + b"\n")
PY
  fi
}

for ((i = 0; i < SUPERNODES; i++)); do
  key="$OUT/supernodes/supernode-$i"
  if [ -f "$key" ] && [ -f "$key.pub" ]; then
    continue
  fi
  make_keypair "$WORK/supernode-$i" "fedasr-supernode-$i"
  publish "$WORK/supernode-$i.pub" "$key.pub" 644
  publish "$WORK/supernode-$i" "$key" 600
  echo "made $key(.pub)"
done
