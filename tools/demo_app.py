#!/usr/bin/env python3
"""The demo application behind Envoy: `./build.sh demo` runs it on 127.0.0.1:18080, and
bench/soak.py serves it on a free port and flips its state on a schedule. Python's standard
library only, so the demo needs no Rust build beyond the plugins.

| request                        | answer                                                      |
|--------------------------------|-------------------------------------------------------------|
| `GET /flags.json`              | a flagd flag-definition document (the `flags` cluster's)    |
| `POST /admin/checkout/disable` | serves its flag `new-checkout` as `DISABLED`                |
| `POST /admin/checkout/enable`  | serves it `ENABLED` again                                   |
| `GET /api/flaky`               | 200 JSON with the time it was made, or 503 while failing    |
| `POST /admin/fail`             | makes `/api/flaky` answer 503 from now on                   |
| `POST /admin/recover`          | makes `/api/flaky` answer 200 again                         |
| `POST /payments`               | 201 JSON with a new payment id (a replay shows the old id)  |
| anything else                  | 200 `upstream saw <method> <path>`                          |

The flag file has an `ETag` per state and gets a 304 for a matching `If-None-Match`, as a real
flag server would. "anything else" adds ` (x-route-checkout: <value>)` when the request has
that header, so the demo shows what the flag router decided. Every answer names what made it in
an `x-upstream` header (`api`, `flaky`, `payment`, `checkout v2`, ...), which the soak
classifies responses by.

Each response is one write on a TCP_NODELAY socket: a head and body split over two segments
would wait for the peer's delayed ACK, which adds 40 ms to a request under load.

Usage: demo_app.py [PORT] (default 18080, the backend marker port of envoy/*.yaml). Binds
127.0.0.1, prints one line per request, runs until killed.
"""

import asyncio
import http
import socket
import sys
import threading
import time

# Served at /flags.json with STATE replaced by the flag's state: beta testers get the new
# checkout, and so does a sticky 20 % of users (bucketed on targetingKey, the x-user-id header
# in envoy/edge.yaml).
FLAGS_JSON = """{
  "$schema": "https://flagd.dev/schema/v0/flags.json",
  "flags": {
    "new-checkout": {
      "state": "STATE",
      "variants": { "on": "v2", "off": "v1" },
      "defaultVariant": "off",
      "targeting": {
        "if": [
          { "==": [{ "var": "tier" }, "beta"] }, "on",
          { "fractional": [["on", 20], ["off", 80]] }
        ]
      }
    }
  }
}
"""

# The flag router's header, echoed so that each request's variant shows.
ROUTE_HEADER = "x-route-checkout"
# A request head larger than this is refused: the application serves small demo requests only.
MAX_HEAD = 64 * 1024

# POST path: (the State field it sets, to what, the answer).
ADMIN = {
    "/admin/checkout/disable": ("checkout_disabled", True, '{"new-checkout":"DISABLED"}'),
    "/admin/checkout/enable": ("checkout_disabled", False, '{"new-checkout":"ENABLED"}'),
    "/admin/fail": ("failing", True, '{"flaky":"failing"}'),
    "/admin/recover": ("failing", False, '{"flaky":"healthy"}'),
}

JSON = "application/json"
TEXT = "text/plain"


class State:
    """What the endpoints change. `payment_delay` (seconds) holds each payment's answer back:
    the soak widens the in-flight window with it so that concurrent repeats meet a claim."""

    def __init__(self, payment_delay=0.0, log=False):
        self.failing = False
        self.checkout_disabled = False
        self.payments = 0
        self.payment_delay = payment_delay
        self.log = log


def answer(state, method, target, headers, body):
    """(status, headers, body, delay in seconds) for one request."""
    path = target.split("?", 1)[0]
    if method in ("GET", "HEAD") and path == "/flags.json":
        return flags(state, headers)
    if method == "POST" and path in ADMIN:
        field, value, text = ADMIN[path]
        setattr(state, field, value)
        return json_reply(200, "admin", text)
    if path == "/api/flaky":
        if state.failing:
            return json_reply(503, "flaky failing",
                              '{"error":"the backend is failing; POST /admin/recover heals it"}')
        return json_reply(200, "flaky", '{"items":["alpha","beta","gamma"],"generated_at_ms":%d}'
                          % unix_millis())
    if method == "POST" and path == "/payments":
        state.payments += 1
        # The clock keeps ids from two runs apart; the counter, ids within a run.
        pay_id = f"pay_{unix_millis():x}_{state.payments}"
        status, extra, text, _ = json_reply(
            201, "payment", f'{{"id":"{pay_id}","status":"created","request_bytes":{len(body)}}}')
        return status, extra, text, state.payment_delay
    variant = headers.get(ROUTE_HEADER)
    text = f"upstream saw {method} {target}"
    if variant is not None:
        text += f" ({ROUTE_HEADER}: {variant})"
    return 200, {"content-type": TEXT, "x-upstream": what_answered(path, headers)}, \
        text.encode(), 0


def what_answered(path, headers):
    """The `x-upstream` of an "anything else" answer; for the checkout, whether the route
    matched the flag router's header (a forged header that routed is named as such)."""
    if path.startswith("/api/"):
        return "api"
    if not (path.startswith("/checkout") or path.startswith("/v2/checkout")):
        return "other"
    variant = headers.get(ROUTE_HEADER)
    on_v2 = path.startswith("/v2/")
    if headers.get("x-soak-forged") and (variant == "v2" or on_v2):
        return "checkout FORGED v2 routed"
    if variant is None:
        return "checkout (flag off)"
    if on_v2 != (variant == "v2"):
        return f"checkout {variant} on the wrong route"
    return f"checkout {variant}"


def json_reply(status, what, text):
    return status, {"content-type": JSON, "x-upstream": what}, text.encode(), 0


def flags(state, headers):
    """The flag file, with an ETag per state so that polls get a 304 while nothing changed."""
    flag_state = "DISABLED" if state.checkout_disabled else "ENABLED"
    etag = f'"{flag_state.lower()}"'
    if headers.get("if-none-match") == etag:
        return 304, {"etag": etag, "x-upstream": "flags"}, b"", 0
    return 200, {"etag": etag, "content-type": JSON, "x-upstream": "flags"}, \
        FLAGS_JSON.replace("STATE", flag_state).encode(), 0


def unix_millis():
    return time.time_ns() // 1_000_000


class Protocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one request at a time per connection (Envoy does not pipeline);
    request bodies by content-length or chunked."""

    def __init__(self, state):
        self.state = state
        self.buf = b""
        self.busy = False
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        self.buf += data
        self.serve()

    def serve(self):
        while not self.busy and not self.transport.is_closing():
            request = self.take_request()
            if request is None:
                return
            method, target, version, headers, body = request
            status, extra, payload, delay = answer(self.state, method, target, headers, body)
            close = version != "HTTP/1.1" or "close" in headers.get("connection", "").lower()
            if self.state.log:
                print(f"upstream: {method} {target} -> {status}", flush=True)
            if delay:
                self.busy = True
                asyncio.get_running_loop().call_later(
                    delay, self.delayed, method, status, extra, payload, close)
            else:
                self.reply(method, status, extra, payload, close)

    def take_request(self):
        """The next whole request from the buffer, or None until more has arrived."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self.reply("GET", 431, {"x-upstream": "head too large"}, b"", close=True)
            return None
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            self.reply("GET", 400, {"x-upstream": "bad request line"}, b"", close=True)
            return None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = self.buf[end + 4:]
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body, used = dechunk(rest)
            if body is None:
                return None
        else:
            used = int(headers.get("content-length", "0") or "0")
            if len(rest) < used:
                return None
            body = rest[:used]
        self.buf = rest[used:]
        return parts[0], parts[1], parts[2], headers, body

    def delayed(self, method, status, extra, payload, close):
        self.busy = False
        if not self.transport.is_closing():
            self.reply(method, status, extra, payload, close)
            self.serve()

    def reply(self, method, status, extra, body, close=False):
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        head = [f"HTTP/1.1 {status} {reason}", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in extra.items()]
        if close:
            head.append("connection: close")
        out = ("\r\n".join(head) + "\r\n\r\n").encode()
        if method != "HEAD" and status not in (204, 304):
            out += body
        self.transport.write(out)
        if close:
            self.transport.close()


def dechunk(data):
    """(body, bytes used) of a complete chunked body at the start of `data`, else (None, 0)."""
    body, pos = b"", 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None, 0
        size = int(data[pos:eol].split(b";", 1)[0].strip() or b"0", 16)
        pos = eol + 2
        if size == 0:
            # Trailers, if any, end with an empty line.
            end = data.find(b"\r\n", pos)
            while end > pos:
                pos = end + 2
                end = data.find(b"\r\n", pos)
            if end < 0:
                return None, 0
            return body, end + 2
        if len(data) < pos + size + 2:
            return None, 0
        body += data[pos:pos + size]
        pos += size + 2


async def serve(state, host, port):
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Protocol(state), host, port, backlog=512)


def start(state, host="127.0.0.1", port=0):
    """Serves the application from a thread of its own; returns (port, stop)."""
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(serve(state, host, port))
    thread = threading.Thread(target=loop.run_forever, name="demo-app", daemon=True)
    thread.start()

    def stop():
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)

    return server.sockets[0].getsockname()[1], stop


async def main(port):
    server = await serve(State(log=True), "127.0.0.1", port)
    print(f"demo application listening on http://127.0.0.1:{port} (Ctrl-C stops it)",
          flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) > 2 or (len(sys.argv) == 2 and not sys.argv[1].isdigit()):
        sys.exit(f"usage: demo_app.py [PORT]; {sys.argv[1:]} is not a port")
    try:
        asyncio.run(main(int(sys.argv[1]) if len(sys.argv) == 2 else 18080))
    except KeyboardInterrupt:
        pass
