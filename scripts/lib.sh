# Shared by scripts/serve and scripts/test: install what is missing, skip what is present.
# Source it; every function is idempotent and never downloads a prebuilt binary or browser.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; return 1
  fi
}

# Debian packages: chromium + chromedriver (browser tests), lavapipe (native WebGPU without a GPU), xvfb.
ensure_apt() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

ensure_system_packages() {
  ensure_apt chromium chromium-driver mesa-vulkan-drivers libvulkan1 xvfb xauth
  command -v npm >/dev/null || ensure_apt nodejs npm
}

ensure_wasm_target() {
  rustup target list --installed | grep -qx wasm32-unknown-unknown && return 0
  log "adding the wasm32-unknown-unknown target"
  rustup target add wasm32-unknown-unknown
}

# wasm-bindgen-cli must be exactly Cargo.lock's wasm-bindgen version, or wasm-pack tries to download one.
# Both tools are built at opt-level 1: on the 2-core VM that took 145 s and 107 s instead of ~175 s and ~140 s,
# and wasm-bindgen then processes our 58 MB module in the same 0.8 s.
ensure_wasm_bindgen() {
  local want
  want=$(awk '/^name = "wasm-bindgen"$/{getline; gsub(/version = |"/,""); print; exit}' "$ROOT/Cargo.lock")
  if [ -z "$want" ]; then echo "wasm-bindgen not found in Cargo.lock" >&2; return 1; fi
  if command -v wasm-bindgen >/dev/null && [ "$(wasm-bindgen --version | awk '{print $2}')" = "$want" ]; then
    return 0
  fi
  log "building wasm-bindgen-cli $want (a few minutes, once)"
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1 cargo install --quiet wasm-bindgen-cli --version "=$want" --force
}

ensure_wasm_pack() {
  command -v wasm-pack >/dev/null && return 0
  log "building wasm-pack (a few minutes, once)"
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1 cargo install --quiet wasm-pack --version 0.15.1
}

# Node packages for the end-to-end tests, exactly as the committed lockfile says.
ensure_node_modules() {
  local dir="$ROOT/tests/e2e"
  local stamp="$dir/node_modules/.installed-from-lock"
  if [ -f "$stamp" ] && cmp -s "$dir/package-lock.json" "$stamp"; then
    return 0
  fi
  log "installing the end-to-end tests' node packages"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$dir/package-lock.json" "$stamp"
}

ensure_wasm_tools() {
  ensure_wasm_target
  ensure_wasm_bindgen
  ensure_wasm_pack
}

# The wasm32 release builds (pkg/, pkg/threads/ and scripts/test's browser tests, which share pkg/'s
# dependencies only if their settings match) leave out the release profile's line tables: wasm-bindgen drops
# DWARF from the modules it writes (function names stay, in the name section), so they only cost build time.
WASM_NO_DEBUG=(env CARGO_PROFILE_RELEASE_DEBUG=false)

# Build pkg/ (the wasm module and its JS glue) for the web page.
build_pkg() {
  log "building pkg/ with wasm-pack"
  (cd "$ROOT" && "${WASM_NO_DEBUG[@]}" wasm-pack build --no-typescript --target web --release --no-pack --out-dir ../pkg crate)
  build_pkg_threads
}

# pkg/threads/: the same module built with wasm threads (atomics, a shared memory of up to 4 GiB), which the
# page's CPU path loads where the page is cross-origin isolated (www/worker.js): rayon runs on Web Workers
# through web.rs's thread pool (www/thread.js). Rust ships wasm32's std without atomics, so std is rebuilt
# from its source (the rust-src component) with `-Z build-std`, an unstable cargo flag that RUSTC_BOOTSTRAP=1
# allows on the stable toolchain everything else builds with (no second toolchain to install). Its own target
# folder: the flags differ, and sharing one would rebuild both every time.
build_pkg_threads() {
  rustup component list --installed | grep -q '^rust-src' || rustup component add rust-src
  # A memory the threads share (imported, so that every Web Worker instantiates the module on it), and the
  # thread-local storage symbols wasm-bindgen's thread start-up needs.
  local a link=""
  for a in --shared-memory --import-memory --max-memory=4294967296 --export=__wasm_init_tls --export=__tls_size \
    --export=__tls_align --export=__tls_base; do link="$link -C link-arg=$a"; done
  log "building pkg/threads/ (wasm threads) with wasm-pack"
  (cd "$ROOT" && CARGO_TARGET_DIR="$ROOT/target/wasm-threads" RUSTC_BOOTSTRAP=1 \
    RUSTFLAGS="--cfg getrandom_backend=\"wasm_js\" -C target-feature=+simd128,+atomics,+bulk-memory,+mutable-globals $link" \
    "${WASM_NO_DEBUG[@]}" wasm-pack build --no-typescript --target web --release --no-pack --out-dir ../pkg/threads crate \
    -- -Z build-std=panic_abort,std)
}

# numpy + pillow for scripts/eval-tiny's judge (a venv inside the checkout, ignored by git).
ensure_judge_python() {
  local venv="$ROOT/.venv-judge"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import numpy, PIL' 2>/dev/null; then return 0; fi
  command -v python3 >/dev/null || ensure_apt python3
  python3 -c 'import venv' 2>/dev/null && python3 -m venv "$venv" 2>/dev/null || { ensure_apt python3-venv; python3 -m venv "$venv"; }
  log "installing numpy and pillow for the judge"
  "$venv/bin/pip" install --quiet --disable-pip-version-check numpy pillow
}

# Mesa's lavapipe with cooperative matrices (VK_KHR_cooperative_matrix: Debian trixie-backports' Mesa 26;
# bookworm's Mesa 22.3 has none), so that the tensor-core GEMM path runs in the tests on any machine. apt
# downloads it with the trixie libraries it needs (signatures checked against the system's keyring) into
# target/mesa-coop, where it is unpacked, once; nothing is installed on the system. Programs use it through
# trixie's dynamic loader: sets COOP_ICD (the driver manifest) and COOP_RUNNER (the loader command).
ensure_coop_lavapipe() {
  local d="$ROOT/target/mesa-coop"
  if [ ! -f "$d/ok" ]; then
    log "fetching Mesa's lavapipe with cooperative matrices (Debian trixie-backports, ~60 MB, once)"
    rm -rf "$d"
    mkdir -p "$d/apt/lists/partial" "$d/apt/cache/archives/partial" "$d/root"
    : >"$d/apt/status"
    printf 'deb [arch=amd64] http://deb.debian.org/debian %s main\n' trixie trixie-backports >"$d/apt/sources.list"
    local o=(-o "Dir::Etc::SourceList=$d/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State::Lists=$d/apt/lists" -o "Dir::State::status=$d/apt/status" -o "Dir::Cache=$d/apt/cache"
      -o APT::Architecture=amd64 -o APT::Architectures=amd64 -o Debug::NoLocking=1)
    apt-get "${o[@]}" -qq update
    apt-get "${o[@]}" -qq install -y --download-only --no-install-recommends -t trixie-backports \
      mesa-vulkan-drivers >/dev/null
    local f
    for f in "$d"/apt/cache/archives/*.deb; do dpkg -x "$f" "$d/root"; done
    rm -rf "$d/apt"
    sed 's#"library_path": "[^"]*"#"library_path": "'"$d"'/root/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so"#' \
      "$d/root/usr/share/vulkan/icd.d/lvp_icd.json" >"$d/lvp.json"
    touch "$d/ok"
  fi
  COOP_ICD="$d/lvp.json"
  COOP_RUNNER="$d/root/usr/lib64/ld-linux-x86-64.so.2 --library-path $d/root/usr/lib/x86_64-linux-gnu"
}
