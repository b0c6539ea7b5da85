# Sourced by the GPU scripts on a bare device machine (run from the repository root):
#   source bench/device_env.sh
# installs the wheels carried in .whl/ into /tmp/site and puts an ffmpeg binary on PATH.
PYTHON=${PYTHON:-python3}
# Wheels carried in .whl/ (git-ignored), fetched on the development machine with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl fastapi starlette pydantic pydantic-core annotated-types \
#     typing-inspection annotated-doc uvicorn websockets ffmpeg-python future opentelemetry-api \
#     importlib-metadata imageio-ffmpeg==0.6.0
# (imageio-ffmpeg 0.6.0: 29 MB; newer wheels are over the device tool's 64 MiB transfer limit).
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# imageio-ffmpeg ships a static ffmpeg binary; put it on PATH as `ffmpeg` when the system has none.
if ! command -v ffmpeg >/dev/null; then
    ffmpeg_exe=$("$PYTHON" -c "import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())" 2>/dev/null) \
        && mkdir -p /tmp/suite-bin && ln -sf "$ffmpeg_exe" /tmp/suite-bin/ffmpeg \
        && export PATH=/tmp/suite-bin:$PATH
fi
