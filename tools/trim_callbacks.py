#!/usr/bin/env python3
"""Removes the exports of callbacks a plugin does not implement from its module (and the
custom sections that only describe the build).

Envoy (proxy-wasm-cpp-host) calls into the VM only for callbacks the module exports; for an
absent one it goes on as if the callback had returned "continue". The modules' dispatcher
(edge_host::dispatch) exports every HTTP callback, so a plugin that only reads request headers
would still pay for a VM crossing on every response body chunk, access log and stream end. The callbacks a plugin implements are read
from its source (`fn on_http_response_body`, ...): a method named anywhere in the crate keeps its
export, so nothing the plugin handles can be dropped.

Usage: trim_callbacks.py MODULE.wasm CRATE_SRC_DIR...   (rewrites MODULE.wasm in place; a
combined module names each stage's crate)
       trim_callbacks.py MODULE.wasm --keep EXPORT,EXPORT...   (keeps exactly the callbacks
named: the bench's replay module exports what the module it replays exports)
Prints the exports it removed.
"""

import os
import re
import sys

# Export -> the context trait methods it dispatches to. An export is dropped when the plugin's
# source names none of them.
CALLBACKS = {
    "proxy_on_request_headers": ["on_http_request_headers"],
    "proxy_on_request_body": ["on_http_request_body"],
    "proxy_on_request_trailers": ["on_http_request_trailers"],
    "proxy_on_response_headers": ["on_http_response_headers"],
    "proxy_on_response_body": ["on_http_response_body"],
    "proxy_on_response_trailers": ["on_http_response_trailers"],
    "proxy_on_log": ["on_log"],
    "proxy_on_done": ["on_done"],
    # Never called for a plugin that starts no callouts, timers, queues or foreign calls, and
    # never for an HTTP filter's network callbacks; dropping them lets wasm-opt remove the
    # dispatch code behind them.
    "proxy_on_tick": ["on_tick"],
    "proxy_on_queue_ready": ["on_queue_ready"],
    "proxy_on_http_call_response": ["on_http_call_response"],
    "proxy_on_grpc_receive_initial_metadata": ["on_grpc_stream_initial_metadata"],
    "proxy_on_grpc_receive": ["on_grpc_call_response", "on_grpc_stream_message"],
    "proxy_on_grpc_receive_trailing_metadata": ["on_grpc_stream_trailing_metadata"],
    "proxy_on_grpc_close": ["on_grpc_call_response", "on_grpc_stream_close"],
    "proxy_on_foreign_function": ["on_foreign_function"],
    "proxy_on_new_connection": ["on_new_connection"],
    "proxy_on_downstream_data": ["on_downstream_data"],
    "proxy_on_downstream_connection_close": ["on_downstream_close"],
    "proxy_on_upstream_data": ["on_upstream_data"],
    "proxy_on_upstream_connection_close": ["on_upstream_close"],
}


def leb(data, i):
    value = shift = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def enc(value):
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def implemented(src_dir):
    text = ""
    for base, _, files in os.walk(src_dir):
        for f in files:
            if f.endswith(".rs"):
                with open(os.path.join(base, f), encoding="utf-8") as fh:
                    text += fh.read()
    methods = {m for ms in CALLBACKS.values() for m in ms}
    return {m for m in methods if re.search(rf"\bfn\s+{m}\s*[<(]", text)}


# Custom sections that only describe the build (the compiler's name and the features it
# enabled, which build.sh passes to wasm-opt itself): no host reads them.
BUILD_SECTIONS = {b"producers", b"target_features"}


def trim(module, drop):
    if module[:8] != b"\0asm\x01\0\0\0":
        raise SystemExit("not a wasm module")
    out, removed, i = bytearray(module[:8]), [], 8
    while i < len(module):
        sid = module[i]
        size, body = leb(module, i + 1)
        end = body + size
        if sid == 0:
            n, k = leb(module, body)
            if module[k:k + n] in BUILD_SECTIONS:
                i = end
                continue
        if sid != 7:
            out += module[i:end]
            i = end
            continue
        count, j = leb(module, body)
        kept = []
        for _ in range(count):
            n, k = leb(module, j)
            name = module[k:k + n].decode()
            _, after = leb(module, k + n + 1)  # kind byte, then index
            if name in drop:
                removed.append(name)
            else:
                kept.append(module[j:after])
            j = after
        section = enc(len(kept)) + b"".join(kept)
        out += bytes([7]) + enc(len(section)) + section
        i = end
    return bytes(out), removed


def main():
    path, srcs = sys.argv[1], sys.argv[2:]
    if srcs[:1] == ["--keep"]:
        kept = set(",".join(srcs[1:]).split(","))
        drop = {export for export in CALLBACKS if export not in kept}
    else:
        keep = set().union(*(implemented(src) for src in srcs))
        drop = {export for export, methods in CALLBACKS.items() if not keep.intersection(methods)}
    with open(path, "rb") as f:
        trimmed, removed = trim(f.read(), drop)
    with open(path, "wb") as f:
        f.write(trimmed)
    print(" ".join(sorted(removed)) or "(none)")


if __name__ == "__main__":
    main()
