#!/usr/bin/env bash
# Regenerates the test utterances: espeak-ng speech, resampled to 24 kHz mono 16-bit by sox.
set -euo pipefail
cd "$(dirname "$0")"
say() {  # say VOICE OUT.wav TEXT
  espeak-ng -v "$1" -s 150 -w "/tmp/$2.raw.wav" "$3"
  sox -D "/tmp/$2.raw.wav" -r 24000 -c 1 -b 16 "$2" norm -3
}
say en-us hello.wav "Hello Moshi, how are you doing today? Tell me something about the ocean."
say en-gb music.wav "What is your favourite kind of music? I like to listen to jazz in the evening."
