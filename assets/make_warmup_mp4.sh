#!/usr/bin/env bash
# Build the committed warm-up assets from scratch (needs ffmpeg with libx264 and espeak-ng):
#   assets/warmup.mp4        ~10 s, H.264 + AAC: espeak-ng speech over a moving test picture
#   assets/default_voice.wav ~3 s, 16 kHz mono PCM16: the default reference voice
# Usage: bash assets/make_warmup_mp4.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

duration_s=10
work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT

espeak-ng -v en-us -s 150 -w "$work_dir/speech.wav" \
  "Hello there. This short clip warms up the duplex model. \
   It has real speech over a moving picture, so that every stage runs once before users arrive. \
   What do you see on the screen right now?"

# Speech padded (or cut) to exactly $duration_s seconds, over a 10 fps moving test pattern.
ffmpeg -nostdin -hide_banner -loglevel error -y \
  -f lavfi -i "testsrc2=size=448x336:rate=10:duration=${duration_s}" \
  -i "$work_dir/speech.wav" \
  -filter_complex "[1:a]aresample=16000,apad=whole_dur=${duration_s}[a]" \
  -map 0:v -map "[a]" -t "$duration_s" \
  -c:v libx264 -preset veryslow -crf 32 -pix_fmt yuv420p \
  -c:a aac -b:a 32k -ac 1 -ar 16000 \
  -movflags +faststart warmup.mp4

espeak-ng -v en-us -s 160 -w "$work_dir/voice.wav" "Hi, I am your assistant. How can I help you today?"
ffmpeg -nostdin -hide_banner -loglevel error -y -i "$work_dir/voice.wav" \
  -ac 1 -ar 16000 -c:a pcm_s16le default_voice.wav

ls -l warmup.mp4 default_voice.wav
