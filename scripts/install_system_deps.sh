#!/usr/bin/env bash
# System packages that pip cannot provide, installed from Debian's archive by `make install`
# (a no-op when they are present): a General MIDI synthesizer and SoundFont to render the sample
# world's music, and espeak-ng for its vocal lines.
set -euo pipefail
packages=(fluidsynth timgm6mb-soundfont espeak-ng)
needed=()
for pkg in "${packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || needed+=("$pkg")
done
[ ${#needed[@]} -eq 0 ] && exit 0
sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
echo "installing system packages: ${needed[*]}"
$sudo_cmd apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${needed[@]}" >/dev/null
