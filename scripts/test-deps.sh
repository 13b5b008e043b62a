#!/usr/bin/env bash
# Installs what the gateway's tests need; idempotent, run as root from the repository root.
#
# - bubblewrap (Debian package `bubblewrap`): the sandbox of command tools.
# - The MCP reference servers and the official TypeScript SDK from the npm registry, pinned, into
#   .test-deps/npm (git-ignored): the MCP client's tests start the servers with node, and the
#   MCP server's interop test drives `agent-runtime mcp serve` with the TypeScript SDK's client.
set -euo pipefail

cd "$(dirname "$0")/.."

if ! command -v bwrap >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y bubblewrap
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm
fi

EVERYTHING_VERSION=2026.8.31
FILESYSTEM_VERSION=2026.8.31
SDK_VERSION=1.32.2
NPM_DIR=.test-deps/npm
want_everything="$NPM_DIR/node_modules/@modelcontextprotocol/server-everything/package.json"
want_filesystem="$NPM_DIR/node_modules/@modelcontextprotocol/server-filesystem/package.json"
want_sdk="$NPM_DIR/node_modules/@modelcontextprotocol/sdk/package.json"
installed() { [ -f "$1" ] && grep -q "\"version\": \"$2\"" "$1"; }
if ! installed "$want_everything" "$EVERYTHING_VERSION" || ! installed "$want_filesystem" "$FILESYSTEM_VERSION" \
    || ! installed "$want_sdk" "$SDK_VERSION"; then
    mkdir -p "$NPM_DIR"
    npm install --no-audit --no-fund --prefix "$NPM_DIR" \
        "@modelcontextprotocol/server-everything@$EVERYTHING_VERSION" \
        "@modelcontextprotocol/server-filesystem@$FILESYSTEM_VERSION" \
        "@modelcontextprotocol/sdk@$SDK_VERSION"
fi
echo "test-deps: bubblewrap $(bwrap --version 2>/dev/null | awk '{print $2}'), MCP reference servers in $NPM_DIR"
