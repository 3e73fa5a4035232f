#!/usr/bin/env bash
# Builds the Go client example offline from Debian's packages, in GOPATH mode (no module proxy):
#   golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
#   protoc-gen-go protoc-gen-go-grpc
# The stubs are generated from protos/ with grpcio-tools' protoc and the Debian plugins.
#   clients/go/build.sh [OUT_DIR]    -> OUT_DIR/semrank-check (default: build/go-client)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$(mkdir -p "${1:-$root/build/go-client}" && cd "${1:-$root/build/go-client}" && pwd)
python=${PYTHON:-$root/.venv/bin/python}
debian_gocode=/usr/share/gocode
for tool in go protoc-gen-go protoc-gen-go-grpc; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool not found; see clients/go/README.md" >&2; exit 2; }
done
[ -d "$debian_gocode/src/google.golang.org/grpc" ] || { echo "build.sh: $debian_gocode has no grpc-go; see clients/go/README.md" >&2; exit 2; }
[ -f "$debian_gocode/src/github.com/golang/protobuf/proto/registry.go" ] || {
  echo "build.sh: $debian_gocode has github.com/golang/protobuf 1.3; install golang-github-golang-protobuf-1-5-dev" >&2; exit 2; }

gopath=$out/gopath
project=$gopath/src/github.com/semrank/semrank
rm -rf "$gopath"
mkdir -p "$project/clients/go"
cp -R "$here/semrank" "$here/cmd" "$project/clients/go/"  # a copy: GOPATH mode and symlinks do not mix
"$python" -m grpc_tools.protoc -I "$root/protos" \
  --plugin=protoc-gen-go="$(command -v protoc-gen-go)" --plugin=protoc-gen-go-grpc="$(command -v protoc-gen-go-grpc)" \
  --go_out="$gopath/src" --go-grpc_out="$gopath/src" \
  "$root/protos/semrank/ranking/v1/ranking_service.proto"
GO111MODULE=off GOPATH="$gopath:$debian_gocode" GOCACHE="$out/cache" GOFLAGS= \
  go build -o "$out/semrank-check" github.com/semrank/semrank/clients/go/cmd/check
echo "$out/semrank-check"
