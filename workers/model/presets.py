"""Model presets as data (MODEL.md §2): the same module classes at different sizes.

`tiny` is the CPU default (random weights, small widths); `minicpm-o-4.5` has the full dimensions.
When a checkpoint is loaded, dimensions come from its `config.json` (`args_from_hf_config`), never
from this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class LLMArgs:
    hidden: int = 4096
    layers: int = 36
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    ffn: int = 12288
    vocab: int = 151748
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6
    max_positions: int = 40960
    tie_embeddings: bool = False


@dataclass(frozen=True)
class VisionArgs:
    hidden: int = 1152
    ffn: int = 4304
    heads: int = 16
    layers_configured: int = 27
    layers_run: int = 26  # drop_vision_last_layer: the last configured layer is not built
    patch: int = 14
    grid: int = 70  # position grid 70x70 (image_size 980 / 14)
    ln_eps: float = 1e-6
    image_size: int = 448  # scale_resolution for resize / slicing


@dataclass(frozen=True)
class ResamplerArgs:
    queries: int = 64
    embed_dim: int = 4096  # = LLM hidden
    heads: int = 32
    kv_dim: int = 1152  # = vision hidden
    ln_eps: float = 1e-6
    max_grid: int = 70


@dataclass(frozen=True)
class AudioArgs:
    n_mels: int = 80
    d_model: int = 1024
    layers: int = 24
    heads: int = 16
    ffn: int = 4096
    max_positions: int = 1500
    projection_hidden: int = 4096  # audio_projection_layer: d_in = ffn // 4 -> hidden -> llm hidden
    llm_hidden: int = 4096
    pool_step: int = 5
    ln_eps: float = 1e-5


@dataclass(frozen=True)
class TTSArgs:
    hidden: int = 768
    ffn: int = 3072
    layers: int = 20
    heads: int = 12
    kv_heads: int = 12
    head_dim: int = 64
    max_positions: int = 4096
    num_audio_tokens: int = 6562  # codes 0..6560, EOS = 6561
    num_text_tokens: int = 152064
    llm_dim: int = 4096
    audio_bos_token_id: int = 151687
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    unused_embed_rows: int = 32000  # tts.model.embed_tokens (exists in the checkpoint, never used)


@dataclass(frozen=True)
class Token2WavArgs:
    """Built-in CosyVoice2-family vocoder (MODEL.md §7): sizes set the amount of work."""

    num_codes: int = 6561
    lookahead: int = 3
    silence_code: int = 4218
    encoder_dim: int = 512
    encoder_layers: int = 10
    encoder_heads: int = 8
    estimator_dim: int = 1024
    estimator_blocks: int = 16
    estimator_heads: int = 16
    flow_steps: int = 5
    speaker_dim: int = 192
    n_mels: int = 80
    vocoder_channels: int = 512  # HiFi-GAN first stage width
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    istft_n_fft: int = 16
    istft_hop: int = 4
    sample_rate: int = 24000
    chunk_codes: int = 25  # 25 codes = 1 s of speech


@dataclass(frozen=True)
class OmniArgs:
    name: str
    llm: LLMArgs = field(default_factory=LLMArgs)
    vision: VisionArgs = field(default_factory=VisionArgs)
    resampler: ResamplerArgs = field(default_factory=ResamplerArgs)
    audio: AudioArgs = field(default_factory=AudioArgs)
    tts: TTSArgs = field(default_factory=TTSArgs)
    token2wav: Token2WavArgs = field(default_factory=Token2WavArgs)


FULL = OmniArgs(name="minicpm-o-4.5")

TINY = OmniArgs(
    name="tiny",
    llm=LLMArgs(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, ffn=768, tie_embeddings=True),
    vision=VisionArgs(hidden=64, ffn=256, heads=2, layers_configured=3, layers_run=2),
    resampler=ResamplerArgs(embed_dim=256, heads=2, kv_dim=64),
    audio=AudioArgs(d_model=64, layers=2, heads=2, ffn=256, projection_hidden=256, llm_hidden=256),
    tts=TTSArgs(hidden=64, ffn=256, layers=2, heads=2, kv_heads=2, head_dim=32, llm_dim=256),
    token2wav=Token2WavArgs(
        encoder_dim=64,
        encoder_layers=1,
        encoder_heads=2,
        estimator_dim=128,
        estimator_blocks=2,
        estimator_heads=2,
        vocoder_channels=64,
    ),
)

PRESETS: dict[str, OmniArgs] = {"tiny": TINY, "minicpm-o-4.5": FULL}


def get_preset(name: str) -> OmniArgs:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def args_from_hf_config(cfg: dict[str, Any], base: OmniArgs = FULL) -> OmniArgs:
    """Dimensions from a MiniCPM-o checkpoint's config.json (LLM keys top-level, others nested)."""
    llm = replace(
        base.llm,
        hidden=cfg.get("hidden_size", base.llm.hidden),
        layers=cfg.get("num_hidden_layers", base.llm.layers),
        heads=cfg.get("num_attention_heads", base.llm.heads),
        kv_heads=cfg.get("num_key_value_heads", base.llm.kv_heads),
        head_dim=cfg.get("head_dim", base.llm.head_dim),
        ffn=cfg.get("intermediate_size", base.llm.ffn),
        vocab=cfg.get("vocab_size", base.llm.vocab),
        rope_theta=float(cfg.get("rope_theta", base.llm.rope_theta)),
        rms_eps=float(cfg.get("rms_norm_eps", base.llm.rms_eps)),
        max_positions=cfg.get("max_position_embeddings", base.llm.max_positions),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", base.llm.tie_embeddings)),
    )
    v = cfg.get("vision_config", {})
    layers_cfg = v.get("num_hidden_layers", base.vision.layers_configured)
    drop_last = bool(cfg.get("drop_vision_last_layer", True))
    vision = replace(
        base.vision,
        hidden=v.get("hidden_size", base.vision.hidden),
        ffn=v.get("intermediate_size", base.vision.ffn),
        heads=v.get("num_attention_heads", base.vision.heads),
        layers_configured=layers_cfg,
        layers_run=layers_cfg - 1 if drop_last else layers_cfg,
        patch=v.get("patch_size", base.vision.patch),
        grid=v.get("image_size", base.vision.grid * base.vision.patch) // v.get("patch_size", base.vision.patch),
        image_size=cfg.get("image_size", base.vision.image_size),
    )
    resampler = replace(
        base.resampler,
        queries=cfg.get("query_num", base.resampler.queries),
        embed_dim=llm.hidden,
        heads=llm.hidden // 128,
        kv_dim=vision.hidden,
    )
    a = cfg.get("audio_config", {})
    audio = replace(
        base.audio,
        n_mels=a.get("num_mel_bins", base.audio.n_mels),
        d_model=a.get("d_model", base.audio.d_model),
        layers=a.get("encoder_layers", base.audio.layers),
        heads=a.get("encoder_attention_heads", base.audio.heads),
        ffn=a.get("encoder_ffn_dim", base.audio.ffn),
        max_positions=a.get("max_source_positions", base.audio.max_positions),
        llm_hidden=llm.hidden,
        projection_hidden=llm.hidden,
        pool_step=cfg.get("audio_pool_step", base.audio.pool_step),
    )
    t = cfg.get("tts_config", {})
    tts = replace(
        base.tts,
        hidden=t.get("hidden_size", base.tts.hidden),
        ffn=t.get("intermediate_size", base.tts.ffn),
        layers=t.get("num_hidden_layers", base.tts.layers),
        heads=t.get("num_attention_heads", base.tts.heads),
        kv_heads=t.get("num_key_value_heads", t.get("num_attention_heads", base.tts.kv_heads)),
        head_dim=t.get("hidden_size", base.tts.hidden) // t.get("num_attention_heads", base.tts.heads),
        max_positions=t.get("max_position_embeddings", base.tts.max_positions),
        num_audio_tokens=t.get("num_audio_tokens", base.tts.num_audio_tokens),
        num_text_tokens=t.get("num_text_tokens", base.tts.num_text_tokens),
        llm_dim=t.get("llm_dim", llm.hidden),
        audio_bos_token_id=t.get("audio_bos_token_id", base.tts.audio_bos_token_id),
    )
    return OmniArgs(name=base.name, llm=llm, vision=vision, resampler=resampler, audio=audio, tts=tts,
                    token2wav=base.token2wav)
