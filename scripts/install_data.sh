#!/usr/bin/env bash
# Install the Debian packages that carry the offline demo data, and the browser of the web page's test
# (tests/serving drives Debian's chromium with Playwright: no browser download), when they are missing.
set -euo pipefail

packages=()
[[ -d /usr/share/datasets/fashion-mnist ]] || packages+=(dataset-fashion-mnist)
[[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ]] || packages+=(fonts-noto-color-emoji)
[[ -x /usr/bin/chromium ]] || packages+=(chromium)
[[ ${#packages[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -eq 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo=(sudo)
else
    echo "error: the demo data and the browser test need the Debian packages: ${packages[*]}" >&2
    echo "       install them as root: apt-get install -y ${packages[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "error: apt-get not found; install ${packages[*]} with your package manager," >&2
    echo "       or copy the Fashion-MNIST idx files to /usr/share/datasets/fashion-mnist/" >&2
    exit 1
fi
echo "installing ${packages[*]} ..."
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${packages[@]}"
