#!/bin/sh
# Makes the two Secrets every paramserver pod in deploy/k8s mounts, which hold key material and so
# are never in the repository:
#   paramserver-tls     ca.crt, node.crt, node.key   -> /etc/paramserver/tls  (PS_TLS_CA/CERT/KEY)
#   paramserver-tokens  member.token, tokens         -> /etc/paramserver/auth (PS_TOKEN_FILE, PS_AUTH_FILE)
# `paramserver certs` writes a CA, the member certificate (scheduler, servers, workers), a user
# certificate and a token per role into DIR; this script then renders DIR/secrets.yaml and, with
# --apply, applies it. DIR keeps ca.key (sign more certificates with it; it never goes into the
# cluster) and what a person connecting from outside needs: ca.crt, user.crt, user.key and
# user.token (or admin.token). DIR holds a .gitignore that keeps all of it out of git.
#
#   deploy/k8s/make-secrets.sh --apply                  # current kubectl namespace
#   deploy/k8s/make-secrets.sh -n ml --apply            # then: kubectl apply -n ml -k deploy/k8s
#   deploy/k8s/make-secrets.sh -n ml                    # only writes DIR/secrets.yaml
#
# The member certificate names the Services of deploy/k8s: paramserver-scheduler (short and
# qualified), and each shard by the name it advertises, paramserver-server-N.paramserver-server,
# for N below -s (shards beyond it need a new certificate: rerun with a larger -s and --force),
# plus *.paramserver-server.NAMESPACE.svc[.CLUSTER_DOMAIN]. Needs `paramserver` on PATH (or
# PARAMSERVER="python -m ps"), base64, and kubectl for --apply.
set -eu

usage() {
    sed -n 's/^#   \(deploy\/\)/\1/p' "$0"
    cat <<EOF
options:
  -n NAMESPACE          namespace of the deployment (default: kubectl's current one, else default)
  -d DIR                where the files go (default: $(dirname "$0")/secrets)
  -s SERVERS            certificate names for shards 0..SERVERS-1 (default: 16)
  -H HOST[,HOST...]     more names or addresses for the certificate (a load balancer, an ingress)
  --days N              validity in days (default: 365)
  --cluster-domain D    the cluster's DNS domain (default: cluster.local)
  --force               make a new CA, certificates and tokens even if DIR has them
  --apply               kubectl apply the Secrets
EOF
}

namespace=""
dir="$(dirname "$0")/secrets"
servers=16
extra=""
days=365
domain=cluster.local
force=""
apply=""
while [ $# -gt 0 ]; do
    case "$1" in
        -n) namespace="$2"; shift 2 ;;
        -d) dir="$2"; shift 2 ;;
        -s) servers="$2"; shift 2 ;;
        -H) extra="$2"; shift 2 ;;
        --days) days="$2"; shift 2 ;;
        --cluster-domain) domain="$2"; shift 2 ;;
        --force) force=1; shift ;;
        --apply) apply=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "make-secrets: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
case "$servers" in ''|*[!0-9]*) echo "make-secrets: -s needs a number, not '$servers'" >&2; exit 2 ;; esac
if [ -z "$namespace" ] && command -v kubectl >/dev/null 2>&1; then
    namespace="$(kubectl config view --minify -o 'jsonpath={..namespace}' 2>/dev/null || true)"
fi
namespace="${namespace:-default}"

hosts="paramserver-scheduler,paramserver-scheduler.$namespace,paramserver-scheduler.$namespace.svc"
hosts="$hosts,paramserver-scheduler.$namespace.svc.$domain"
i=0
while [ "$i" -lt "$servers" ]; do
    hosts="$hosts,paramserver-server-$i.paramserver-server"
    i=$((i + 1))
done
# Wildcards last: gRPC checks the names in order and complains of a wildcard it cannot apply.
hosts="$hosts,*.paramserver-server.$namespace.svc,*.paramserver-server.$namespace.svc.$domain"
[ -z "$extra" ] || hosts="$hosts,$extra"

umask 077
mkdir -p "$dir"
[ -e "$dir/.gitignore" ] || printf '# keys and tokens: never commit these\n*\n' > "$dir/.gitignore"
if [ -e "$dir/tokens" ] && [ -z "$force" ]; then
    echo "make-secrets: keeping the CA, certificates and tokens in $dir (--force makes new ones, e.g. after" \
         "changing -n, -s or -H)" >&2
else
    # shellcheck disable=SC2086  # PARAMSERVER may be a command with arguments
    ${PARAMSERVER:-paramserver} certs "$dir" --hosts "$hosts" --days "$days" ${force:+--overwrite}
fi

b64() { base64 < "$dir/$1" | tr -d '\n'; }
secret() {  # NAME KEY...
    name="$1"; shift
    printf -- '---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n  namespace: %s\n' "$name" "$namespace"
    printf '  labels:\n    app.kubernetes.io/name: paramserver\n    app.kubernetes.io/part-of: paramserver\n'
    printf 'type: Opaque\ndata:\n'
    for key in "$@"; do
        printf '  %s: %s\n' "$key" "$(b64 "$key")"
    done
}
{
    echo "# Made by deploy/k8s/make-secrets.sh for namespace $namespace: key material, do not commit."
    secret paramserver-tls ca.crt node.crt node.key
    secret paramserver-tokens member.token tokens
} > "$dir/secrets.yaml"

if [ -n "$apply" ]; then
    kubectl apply -f "$dir/secrets.yaml"
else
    echo "make-secrets: wrote $dir/secrets.yaml; apply it with: kubectl apply -f $dir/secrets.yaml" >&2
fi
echo "make-secrets: clients outside the cluster use $dir/ca.crt, user.crt, user.key and user.token" \
     "(PS_TLS_CA, PS_TLS_CERT, PS_TLS_KEY, PS_TOKEN_FILE)" >&2
