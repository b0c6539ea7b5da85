"""`DuplexEngine`: one per worker. Builds or loads the model, tokenizer and token2wav once, owns the KV slots.

Device and dtype policy (`model.device`, `model.dtype`):
* device `auto` = `cuda` when available, else `cpu`;
* dtype `auto` = bfloat16 on CUDA, float32 on CPU plus a bfloat16 copy of the LM head for decode
  logits. Measured on the 2-core development CPU (torch 2.13, AVX-512 BF16/AMX): a whole bfloat16 LLM
  decode step is no faster than float32 (≈ 9 ms) and pays a large one-off cost (≈ 100 ms per step) for
  every new attention-length bucket, while the fixed-shape head alone gains ≈ 1.8 ms per step;
* an explicit dtype applies to the whole model. Token2wav always runs in float32 (as the reference).

KV slots: `service.sessions_per_worker` slots of `duplex.max_kv_tokens` positions in the LLM cache (and
TTS max positions in the TTS cache, and one token2wav state); a session takes a free slot and gives it
back on close.

CUDA graphs (`fast` mode on CUDA with `compile.cuda_graphs`): the decoder runners, the step heads (LM head
+ decode rule, TTS head + sampling), the token steps (a decode step with its head), token2wav's chunk
step and the streaming audio unit per slot, and the vision encoder per image patch grid replay
hand-captured graphs. `warmup()`
compiles and captures them all before sessions (after `workers.compile.apply_torch_compile`, so the
graphs hold the compiled code); what a session captures later is counted by `recompiles_since_warmup()`.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from common.config import ServiceConfig
from workers.engine.decoding import control_mask, forbidden_mask
from workers.engine.heads import DecodeHeads
from workers.engine.runners import DecoderRunner, Mode
from workers.engine.session import DuplexSession, Schedule
from workers.engine.token_steps import LLMTokenSteps, TTSTokenSteps
from workers.model.apm import StreamingAudioSlots
from workers.model.checkpoint import load_checkpoint
from workers.model.image import common_source_grids
from workers.model.omni import OmniModel, build_model
from workers.model.presets import get_preset
from workers.model.token2wav import Token2Wav
from workers.model.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NoFreeSlotError(RuntimeError):
    """Every KV slot of this worker is taken by an open session."""


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` -> cuda if available else cpu; anything else as given."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_acceleration(name: str, device: torch.device) -> Mode:
    """`auto` -> `fast` on CUDA, `eager` on CPU (where `service.compile` compiles the modules in place)."""
    if name != "auto":
        return name  # type: ignore[return-value]
    return "fast" if device.type == "cuda" else "eager"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The model dtype for a config dtype name on `device` (`auto`: bfloat16 on CUDA, float32 on CPU)."""
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class DuplexEngine:
    """Shared weights and slot bookkeeping for the sessions of one worker."""

    def __init__(self, cfg: ServiceConfig, device: str | torch.device | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(device if device is not None else cfg.model.device)
        dtype = resolve_dtype(cfg.model.dtype, self.device)
        base = get_preset(cfg.model.preset)
        torch.manual_seed(cfg.model.seed)
        if cfg.model.model_path:
            self.model, report = load_checkpoint(
                cfg.model.model_path, self.device, dtype, base=base,
                allow_partial_load=cfg.model.allow_partial_load,
            )
            weights = "real" if report.complete else "partial"
        else:
            self.model: OmniModel = build_model(base, self.device, dtype)
            weights = "random"
        self.model.tts.fold_weight_norm()  # the head's weight norm is constant at inference
        args = self.model.args
        self.tokenizer = load_tokenizer(cfg.model.model_path)
        self.token2wav = Token2Wav(args.token2wav, device=self.device, dtype=torch.float32)
        self.slots = cfg.service.sessions_per_worker
        self.max_kv_tokens = min(cfg.duplex.max_kv_tokens, args.llm.max_positions)
        self.model.llm.model.setup_caches(self.slots, self.max_kv_tokens)
        self.model.tts.model.setup_caches(self.slots, args.tts.max_positions)
        self.acceleration = resolve_acceleration(cfg.model.acceleration, self.device)
        self.cuda_graphs = (cfg.compile.cuda_graphs and self.acceleration == "fast"
                            and self.device.type == "cuda")
        runner_options = {"triton_kernels": cfg.compile.triton_kernels and self.acceleration == "fast",
                          "decode_attention_kernel": cfg.compile.decode_attention_kernel,
                          "gemv_kernel": cfg.compile.gemv_kernel,
                          "decode_fusion": cfg.compile.decode_fusion,
                          "cuda_graphs": self.cuda_graphs}
        self.llm_runner = DecoderRunner(self.model.llm.model, self.acceleration, self.max_kv_tokens,
                                        **runner_options)
        self.tts_runner = DecoderRunner(self.model.tts.model, self.acceleration, **runner_options)
        self.token2wav.setup_slots(self.slots, cuda_graphs=self.cuda_graphs)
        self.audio_slots = StreamingAudioSlots(self.model, self.slots, cuda_graphs=self.cuda_graphs)
        if self.cuda_graphs:
            self.model.use_captured_vision()
        self.logits_head = self._cpu_logits_head(cfg)
        vocab = args.llm.vocab
        self.forbidden_mask = forbidden_mask(vocab, self.tokenizer.bad_token_ids, self.device)
        self.control_mask = control_mask(vocab, self.device)
        # fast mode: the LM head + decode rule and the TTS sampling as fixed-shape calls (graphs on CUDA)
        self.heads = (DecodeHeads(self.model, self.logits, self.forbidden_mask, self.control_mask, self.slots)
                      if self.acceleration == "fast" else None)
        # fast mode: each decode step with its head as one call (token in, next token out)
        token_steps = self.heads is not None and cfg.compile.token_steps
        self.llm_steps = LLMTokenSteps(self.model, self.llm_runner, self.heads, self.slots) if token_steps else None
        self.tts_steps = TTSTokenSteps(self.model, self.tts_runner, self.heads, self.slots) if token_steps else None
        self.default_voice = _load_voice(cfg.model.default_voice_path)
        # Frames are resized and sliced here (CPU) while the session encodes the unit's audio.
        self.frame_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="frames")
        self._free_slots = list(range(self.slots))
        self._slot_lock = threading.Lock()
        self.info = {
            "preset": base.name,
            "weights": weights,
            "device": str(self.device),
            "dtype": str(dtype).removeprefix("torch."),
            "logits_dtype": str(self.logits_head.dtype if self.logits_head is not None else dtype)
            .removeprefix("torch."),
            "acceleration": self.acceleration,
            "slots": self.slots,
            "max_kv_tokens": self.max_kv_tokens,
        }

    def _cpu_logits_head(self, cfg: ServiceConfig) -> torch.Tensor | None:
        """On CPU with dtype `auto`, a bfloat16 copy of the LM head for decode logits (None elsewhere).

        The 151 748-row head is most of a tiny-preset decode step; in bfloat16 it takes ≈ 4.5 ms instead of
        ≈ 6.3 ms (2-core development CPU). Its one shape is warmed here, so no step pays the first-call cost.
        """
        if self.device.type != "cpu" or cfg.model.dtype != "auto":
            return None
        head = self.model.llm.lm_head.weight.detach().to(torch.bfloat16)
        torch.nn.functional.linear(torch.zeros(1, head.shape[1], dtype=head.dtype), head)
        return head

    def logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """float32 logits [V] of post-norm hidden [1, H] (the CPU bfloat16 head when the engine has one)."""
        if self.logits_head is None:
            return self.model.llm.logits(hidden_last)[0]
        return torch.nn.functional.linear(hidden_last.to(self.logits_head.dtype), self.logits_head)[0].float()

    @torch.no_grad()  # as sessions run: dynamo guards on grad mode, so a compile here must match theirs
    def warmup(self) -> None:
        """Compile and capture every decoder shape a session can need, for every slot, and with CUDA
        graphs also token2wav's chunk step and the audio encoder's unit per slot, and the vision encoder
        of the common patch grids (`common_source_grids`; the warm-up MP4's 4:3 frames are one of them).
        Eager: nothing to do.

        Writes scratch K/V into the slots, so it runs before any session takes one; run it after
        `apply_torch_compile`, so that the graphs capture the compiled modules.
        """
        slots = range(self.slots)
        self.llm_runner.warmup(slots)
        self.tts_runner.warmup(slots)
        if self.heads is not None and self.cuda_graphs:
            with self.llm_runner.kernel_switches():  # the heads' products take the decoders' kernels
                self.heads.capture()
        if self.llm_steps is not None and self.tts_steps is not None:
            self.llm_steps.warmup(slots)
            self.tts_steps.warmup(slots)
        self.token2wav.warmup_slots()
        if self.model.vision_calls is not None:
            self.model.warmup_vision(common_source_grids(self.model.args.vision))
        self.audio_slots.warmup()

    def recompiles_since_warmup(self) -> int:
        """Compiles and graph captures sessions needed after `warmup()` (must stay 0)."""
        vision = self.model.vision_calls
        token_steps = sum(steps.late_captures for steps in (self.llm_steps, self.tts_steps) if steps is not None)
        return (self.llm_runner.recompiles_since_warmup() + self.tts_runner.recompiles_since_warmup()
                + self.token2wav.late_captures + (vision.late_captures if vision is not None else 0)
                + self.audio_slots.late_captures + token_steps)

    def new_session(self, session_id: str, schedule: Schedule = "natural") -> DuplexSession:
        """A session on a free KV slot; raises NoFreeSlotError when all are taken."""
        with self._slot_lock:
            if not self._free_slots:
                raise NoFreeSlotError(f"all {self.slots} KV slots are in use")
            slot = self._free_slots.pop(0)
        return DuplexSession(self, session_id, slot, schedule=schedule)

    def release_slot(self, slot: int) -> None:
        with self._slot_lock:
            if slot not in self._free_slots:
                self._free_slots.append(slot)
                self._free_slots.sort()

    @property
    def free_slots(self) -> int:
        with self._slot_lock:
            return len(self._free_slots)


def _load_voice(path: str | None) -> np.ndarray | None:
    """The default reference voice as 16 kHz float32 samples (None when not configured)."""
    if not path:
        return None
    from workers.media import load_media

    clip = load_media(Path(path))
    return np.concatenate(clip.audio_chunks)
