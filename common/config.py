"""The one configuration schema of the service (gateway and workers).

`config.json` at the repository root is validated against `ServiceConfig` at start; an unknown
key or a bad value stops the process with a message that names it. CLI flags override the file
through `load_config(path, overrides)` with dotted keys (`model.preset=tiny`).

`SessionSettings` is the per-session decoding configuration a client may send (legacy
`prepare.config`, realtime `session.init.payload.config` after translation). Every `prepare`
starts from the server defaults in `duplex.session_defaults`; nothing leaks between sessions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = REPO_ROOT / "config.json"


class _Strict(BaseModel):
    """Config sections reject unknown keys: a typo in config.json must not pass silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SessionSettings(BaseModel):
    """Per-session decoding settings (PROTOCOL.md §1.5). Unknown keys are ignored, as clients send extras."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    generate_audio: bool = True
    ls_mode: Literal["explicit"] = "explicit"
    force_listen_count: int = Field(3, ge=0, le=1000)
    max_new_speak_tokens_per_chunk: int = Field(20, ge=1, le=64)
    decode_mode: Literal["sampling", "greedy"] = "sampling"
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_k: int = Field(20, ge=0)
    top_p: float = Field(0.8, ge=0.0, le=1.0)
    text_repetition_penalty: float = Field(1.05, ge=1.0, le=10.0)
    text_repetition_window_size: int = Field(512, ge=1, le=65536)
    length_penalty: float = Field(1.1, ge=0.1, le=5.0)
    listen_prob_scale: float = Field(1.0, ge=0.0)
    listen_top_k: int | None = Field(None, ge=1)
    tts_temperature: float = Field(0.8, ge=0.0, le=2.0)
    listen_audio: Literal["silence", "empty"] = "silence"
    max_kv_tokens: int | None = Field(None, ge=256, description="per-session cap, min'd with the server cap")
    max_tokens: int | None = Field(None, ge=1, description="cap on text tokens per spoken turn")
    reference_decode: bool = Field(False, description="bit-exact reference decode rule (MODEL.md §6 #1-2)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class ModelConfig(_Strict):
    preset: Literal["tiny", "minicpm-o-4.5"] = "tiny"
    model_path: str | None = Field(None, description="directory of a MiniCPM-o 4.5 checkpoint")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU"
    )
    device: str = Field("auto", description="auto = cuda:<gpu_id> if CUDA is available, else cpu")
    allow_partial_load: bool = False
    seed: int = 0
    default_voice_path: str | None = Field(None, description="16 kHz WAV used when a session sends no voice")
    acceleration: Literal["auto", "eager", "compile-default", "fast"] = Field(
        "auto", description="auto = fast on CUDA, eager on CPU unless service.compile"
    )


class CompileConfig(_Strict):
    mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    dynamic: bool | None = None
    fullgraph: bool = False
    modules: list[Literal["vpm", "llm", "resampler", "tts", "apm", "token2wav"]] = Field(
        default_factory=lambda: ["vpm", "llm", "resampler", "tts", "token2wav"]
    )
    cuda_graphs: bool = True
    triton_kernels: bool = True
    decode_attention_kernel: bool = Field(True, description="split-KV Triton attention for decode steps")
    gemv_kernel: bool = Field(True, description="single-row matmuls of decode steps (and SwiGLU) in Triton")
    decode_fusion: bool = Field(True, description="decode steps fold RMSNorms and residual adds into the GEMV "
                                                  "kernels and q/k norms, RoPE and the KV write into one "
                                                  "(1-7 ms less per speak unit on an H200; docs/BENCHMARKS.md)")
    token_steps: bool = Field(True, description="fast mode: a decode step and its head (LM head + decode rule, "
                                                "code head + sampling) as one call, TTS steps launched one ahead "
                                                "of the host's reads (2.8 ms less per speak unit on an H100; "
                                                "docs/BENCHMARKS.md)")
    cache_dir: str = "torch_compile_cache"


class LimitsConfig(_Strict):
    max_message_bytes: int = Field(128 * 1024 * 1024, ge=1024)
    max_session_s: float = Field(3600.0, gt=0)
    idle_timeout_s: float = Field(120.0, gt=0)
    max_queue_size: int = Field(100, ge=0)
    max_chunk_s: float = Field(10.0, gt=0)
    max_ref_audio_s: float = Field(30.0, gt=0)
    max_frame_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_frame_pixels: int = Field(40_000_000, ge=1)
    max_frames_per_chunk: int = Field(4, ge=1)
    queue_hold_messages: int = Field(64, ge=1)
    queue_hold_bytes: int = Field(128 * 1024 * 1024, ge=1024)


class SupervisorConfig(_Strict):
    """How `python -m server.supervisor` (started by start_all.sh) keeps local workers running."""

    hang_timeout_s: float = Field(10.0, gt=0, description="kill and restart a worker whose /health is silent this long")
    start_timeout_s: float = Field(180.0, gt=0, description="longest wait for a new worker's first /health answer")
    backoff_initial_s: float = Field(1.0, ge=0, description="delay before the first restart; doubles per failure")
    backoff_max_s: float = Field(30.0, ge=0)
    max_start_failures: int = Field(
        3, ge=1, description="give up (supervisor exits 1) after this many starts in a row that never got ready"
    )


class ServiceSection(_Strict):
    host: str = "0.0.0.0"
    gateway_port: int = Field(8006, ge=1, le=65535)
    worker_base_port: int = Field(22400, ge=1, le=65535)
    worker_urls: list[str] = Field(default_factory=list, description="extra workers on other hosts")
    compile: bool = Field(True, description="torch.compile the backbones at worker start")
    warmup: bool = True
    warmup_seconds: float = Field(10.0, ge=1.0, le=60.0, description="seconds of assets/warmup.mp4 to use")
    run_dir: str = "run"
    ref_audio_dir: str | None = Field(None, description="allow-listed directory for prepare.ref_audio_path")
    health_poll_s: float = Field(1.0, gt=0)
    worker_dead_after_s: float = Field(5.0, gt=0)
    sessions_per_worker: int = Field(1, ge=1)
    session_types: list[Literal["audio_duplex", "omni_duplex"]] = Field(
        default_factory=lambda: ["audio_duplex", "omni_duplex"],
        description="session types the gateway serves; a connection for another one is closed 1008 "
                    "(PROTOCOL.md §1.10)",
    )
    allow_reprepare: bool = False
    listen_audio: Literal["silence", "empty"] = "silence"
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)


class DuplexConfig(_Strict):
    session_defaults: SessionSettings = Field(default_factory=SessionSettings)
    system_prompt: str = "You are a helpful assistant."
    pause_timeout_s: float = Field(60.0, ge=1, le=300)
    max_kv_tokens: int = Field(8192, ge=512)
    context_policy: Literal["sliding", "context", "none"] = "sliding"
    sliding_high_tokens: int = Field(4000, ge=128)
    sliding_low_tokens: int = Field(3500, ge=64)
    context_max_units: int = Field(24, ge=1)
    context_previous_tokens: int = Field(500, ge=0)
    deferred_finalize: bool = True
    unit_chunk_samples: int = 16000

    @field_validator("sliding_low_tokens")
    @classmethod
    def _low_below_high(cls, v: int, info: Any) -> int:
        high = info.data.get("sliding_high_tokens")
        if high is not None and v >= high:
            raise ValueError("must be lower than sliding_high_tokens")
        return v


class AuthConfig(_Strict):
    api_keys: list[str] = Field(default_factory=list)
    api_keys_file: str | None = None
    worker_secret: str | None = Field(None, description="shared secret the gateway presents to workers")


class TLSConfig(_Strict):
    enabled: bool = False
    cert_path: str | None = None
    key_path: str | None = None


class RecordingConfig(_Strict):
    enabled: bool = False
    dir: str = "data/recordings"
    retention_sessions: int = Field(100, ge=1)


class ServiceConfig(_Strict):
    """The whole of config.json."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    service: ServiceSection = Field(default_factory=ServiceSection)
    compile: CompileConfig = Field(default_factory=CompileConfig)
    duplex: DuplexConfig = Field(default_factory=DuplexConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    recording: RecordingConfig = Field(default_factory=RecordingConfig)



class ConfigError(ValueError):
    """config.json or an override is invalid; the message names the key."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"invalid override {dotted!r}: {p} is not a section")
    node[parts[-1]] = value


def _parse_override_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> ServiceConfig:
    """Read and validate config.json (or `path`), then apply `key.sub=value` overrides.

    Raises ConfigError with a message naming each bad key.
    """
    source = Path(path) if path else DEFAULT_CONFIG_PATH
    data: dict[str, Any] = {}
    if source.exists():
        try:
            data = json.loads(source.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be an object")
    elif path is not None:
        raise ConfigError(f"config file not found: {source}")
    items = overrides.items() if isinstance(overrides, dict) else (
        (o.split("=", 1) if "=" in o else (o, "true")) for o in (overrides or [])
    )
    for key, value in items:
        _set_dotted(data, key, _parse_override_value(value) if isinstance(value, str) else value)
    try:
        return ServiceConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, str(source))) from e


def load_config_or_report(path: str | Path | None, overrides: list[str] | dict[str, Any] | None,
                          program: str) -> ServiceConfig | None:
    """`load_config` for an entry point: None after printing `program: <error>` to stderr (it then exits 2)."""
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config PATH` and repeatable `--set KEY=VALUE` (into `args.overrides`) for `load_config`."""
    parser.add_argument("--config", default=None, help="config.json path (default: the repository's)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key with a dotted name, e.g. --set model.preset=tiny (repeatable)",
    )


def validate_session_settings(base: SessionSettings, overrides: dict[str, Any]) -> SessionSettings:
    """Apply a client's `config` object on top of the server defaults.

    Raises ConfigError naming the offending key (PROTOCOL.md §4 row 18 -> `invalid_config`).
    Unknown keys are ignored.
    """
    merged = base.model_dump()
    merged.update(overrides)
    try:  # strict: "0.5" for a number or "no" for a bool is a wrong type, not a value to coerce
        return SessionSettings.model_validate(merged, strict=True)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"invalid config value for {key!r}: {first['msg']}") from e
