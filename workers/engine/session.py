"""One duplex session (MODEL.md §3.2-§4): prepare, per-unit prefill + generate + TTS + vocoder, finalize.

All per-session state lives on the `DuplexSession` object: its KV slot position and unit ledger, the
audio buffer and streaming audio encoder, the turn state, the TTS position, the vocoder stream, the
recent-token window and the random generator. `prepare` resets every piece of it, so nothing leaks from
one session (or one prepare) to the next.

Units (PROTOCOL.md §4 rows 9-10): a unit runs only when `unit_chunk_samples` (16 000) new samples are
buffered; the first unit is left-padded with 560 zeros to 16 560 samples, as the reference does.

Finalize is lazy: `finalize()` records the unit with its `[T, </unit>]` and reserves their two positions,
and the next forward feeds them in front of its own input (the next unit's prefill), at the same
positions, so each unit costs one LLM weight read less. Anything that moves or re-encodes the cache (a
context policy's eviction) writes them first, so the cache is the one an immediate feed would leave.

Schedules: `natural` follows the model's own decisions (MODEL.md §4). `forced` is the scripted
behaviour driver of MODEL.md §2.4 for random-weight benchmarks: listen 3 units, then 5 speaking units
of all 20 decode steps (19 fed tokens + terminator, no 28-character cap) with 25 TTS codes each, the
5th ending the turn, and repeat. It runs the same forward calls; only the token choice is scripted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image

from common.config import SessionSettings
from workers.engine.context import KVLedger, PolicyLimits, UnitRecord
from workers.engine.decoding import RULE_CALLS_MAX, DecodeParams, choose_token, draw_uniforms
from workers.model import tokens
from workers.model.apm import StreamingAudioEncoder
from workers.model.image import slice_count, slice_image
from workers.model.tts import CodeStepper, CodeSteps

if TYPE_CHECKING:
    from workers.engine.engine import DuplexEngine
    from workers.model.omni import OmniModel
    from workers.model.token2wav import Token2WavStream

Schedule = Literal["natural", "forced"]

FIRST_UNIT_SAMPLES = 16_560  # MODEL.md §4: the first unit is left-padded to 1.035 s
OUTPUT_SAMPLE_RATE = 24_000
MAX_UNIT_TEXT_CHARS = 28
PREVIOUS_HEADER = "\n\nprevious: "  # the context policy's block of dropped units' text (MODEL.md §5)
TTS_CODES_PER_UNIT = 26  # max new codes per speaking unit (and min, except a turn's first and last unit)
AUDIO_EMBEDS_PER_UNIT = 10  # 1 s of audio -> 10 LLM embeddings
VISION_WRAP_TOKENS = 2  # <image>/<slice> and </image>/</slice> around each image's embeddings

# Forced schedule (MODEL.md §2.4): per cycle, listening units then speaking units, the last ends the turn.
FORCED_LISTEN_UNITS = 3
FORCED_SPEAK_UNITS = 5
FORCED_TTS_CODES = 25


class PromptTooLong(ValueError):
    """`prepare`'s system block (prompt and voice) does not fit under the session's KV cap."""


@dataclass
class PrepareResult:
    prompt_length: int  # characters of the assembled prompt string (wire compatibility)
    prompt_tokens: int  # KV length after prepare


@dataclass
class UnitResult:
    is_listen: bool
    text: str
    audio: np.ndarray  # float32 24 kHz; empty when listening
    end_of_turn: bool
    n_tokens: int  # text tokens kept in this unit
    n_tts_tokens: int
    kv_cache_length: int  # after generate, before finalize
    vision_slices: int
    vision_tokens: int
    # prefill (vision + audio + the LLM forward), vision, audio, llm (decode loop), tts (incl. tts_prep),
    # tts_prep, token2wav, generate (llm + tts + token2wav); stages that did not run are absent
    timings_ms: dict[str, float] = field(default_factory=dict)
    session_end: str | None = None  # "context_full" when the unit could not run
    unit_index: int = 0
    decode_steps: int = 0  # LLM forwards during generate (for per-step timing)


@dataclass
class _Generated:
    """What the generate loop of one unit produced."""

    fed_ids: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)
    text_hidden: list[torch.Tensor] = field(default_factory=list)
    terminator: int = tokens.LISTEN
    spoke: bool = False
    end_of_turn: bool = False
    forwards: int = 0


@dataclass
class _PendingFinalize:
    start: int
    index: int
    kind: Literal["listen", "speak"]
    fed_ids: list[int]
    terminator: int
    text: str


class _Timer:
    """Per-stage wall-clock times in ms; synchronises CUDA at stage boundaries so times are real."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1000.0


class DuplexSession:
    """Per-session duplex state on one KV slot of the engine's shared model."""

    def __init__(self, engine: DuplexEngine, session_id: str, slot: int, schedule: Schedule = "natural") -> None:
        self.engine = engine
        self.session_id = session_id
        self.slot = slot
        self.schedule: Schedule = schedule
        self.closed = False
        self.last_finalize_ms = 0.0
        self._reset(engine.cfg.duplex.session_defaults)

    # ----------------------------------------------------------------------------------------- state
    def _reset(self, settings: SessionSettings) -> None:
        """Fresh per-session state for `settings` (every field takes effect for this session only)."""
        engine = self.engine
        self.settings = settings
        self.params = DecodeParams.from_settings(settings)
        self.generator = torch.Generator(device=engine.device)
        if settings.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(settings.seed)
        duplex = engine.cfg.duplex
        cap = min(engine.max_kv_tokens, settings.max_kv_tokens or engine.max_kv_tokens)
        limits = PolicyLimits.clamp(cap, duplex.sliding_high_tokens, duplex.sliding_low_tokens,
                                    duplex.context_max_units, duplex.context_previous_tokens)
        self.ledger = KVLedger(duplex.context_policy, limits)
        self.position = 0  # next LLM KV position of this slot
        self.unfed_ids: list[int] = []  # finalized ids reserved at the slot's end, fed by the next forward
        self.audio_buffer = np.zeros(0, dtype=np.float32)
        self.audio_encoder = StreamingAudioEncoder(engine.model, engine.audio_slots, self.slot)
        self.units_run = 0
        # The recent-token window: a deque for the eager rule; for the captured rule, the slot's `RuleState`
        # (settings rows, a device ring of `repetition_window` entries padded to the rule's size, the unit's
        # random numbers). A chosen id is written to the ring when it is fed (by the token step) or when
        # the ring is next read, whichever comes first (`_ring_unwritten`).
        self.recent_ids: deque[int] = deque(maxlen=self.params.repetition_window)
        self.captured_rule = engine.heads is not None and self.params.fits_captured_rule()
        if self.captured_rule:
            self._rule = engine.heads.reset_rule(self.slot, self.params)
            self._recent_count = 0
            self._ring_unwritten: tuple[int, int] | None = None
        self._uniforms = torch.zeros(0, 2)  # the eager rule's random numbers of this unit, a row per rule call
        self.turn_open = False
        self.turn_text_tokens = 0
        self.turn_speaking_units = 0
        self.tts_position = 0
        self.vocoder: Token2WavStream | None = None
        self.pending: _PendingFinalize | None = None
        self.prepared = False

    # ---------------------------------------------------------------------------------- model calls
    @property
    def _model(self) -> OmniModel:
        return self.engine.model

    def _forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """Feed embeddings [1, T, H] at the next positions, after the unfed finalized ids if any (in the same
        forward, at their reserved positions); returns the final hidden states of `embeds` [1, T, H]."""
        unfed, self.unfed_ids = self.unfed_ids, []
        if unfed:
            embeds = torch.cat([self._embed(unfed).to(embeds.dtype), embeds], dim=1)
        start = self.position - len(unfed)
        hidden = self.engine.llm_runner(embeds.to(self._model.llm_dtype), start, self.slot)
        self.position = start + embeds.shape[1]
        return hidden[:, len(unfed):]

    def feed_unfed(self) -> None:
        """Write the reserved finalized ids now (before the cache is moved or re-encoded)."""
        ids, self.unfed_ids = self.unfed_ids, []
        if ids:
            self.engine.llm_runner(self._embed(ids).to(self._model.llm_dtype), self.position - len(ids), self.slot)

    def _embed(self, ids: list[int]) -> torch.Tensor:
        return self._model.llm.embed(torch.tensor(ids, dtype=torch.long, device=self.engine.device))

    def _next_token(self, hidden_last: torch.Tensor, row: int, text_only: bool = False) -> int:
        """The decode rule on post-norm hidden [1, H] with the unit's random-number row `row`: the engine's
        captured LM head + rule when the session's settings fit it, else the same rule called eagerly.
        `text_only` masks control tokens (the forced schedule's text steps)."""
        engine = self.engine
        if self.captured_rule:
            self._write_remembered()
            rule = self._rule
            return int(engine.heads.llm(hidden_last, rule.settings[int(text_only)], rule.ring, rule.uniforms[row]))
        return choose_token(engine.logits(hidden_last), self.params, self.recent_ids, engine.forbidden_mask,
                            None, text_only=text_only, control=engine.control_mask, uniforms=self._uniforms[row])

    def _feed(self, token: int, rule_row: int | None, text_only: bool) -> tuple[torch.Tensor, int | None]:
        """Feed one chosen token; with `rule_row`, also run the decode rule on its hidden state (the token
        step, one call, when the rule is captured). Returns (post-norm hidden [1, H], the rule's choice or
        None when it has not run)."""
        if self.captured_rule and self.engine.llm_steps is not None and rule_row is not None and not self.unfed_ids:
            assert self._ring_unwritten is not None  # every fed token was remembered first
            ring_index, ring_token = self._ring_unwritten
            self._ring_unwritten = None
            chosen, hidden = self.engine.llm_steps(self.slot, token, self.position, ring_index, ring_token,
                                                   text_only, rule_row)
            self.position += 1
            return hidden.view(1, -1), chosen
        hidden = self._forward(self._embed([token]))[:, -1]
        return hidden, None if rule_row is None else self._next_token(hidden, rule_row, text_only)

    def _remember(self, token: int) -> None:
        """Add a chosen token to the recent-token window: the deque the eager rule reads, or the device
        ring of the captured rule (written when fed or before the ring is next read)."""
        if self.captured_rule:
            self._write_remembered()
            self._ring_unwritten = (self._recent_count % self.params.repetition_window, token)
            self._recent_count += 1
        else:
            self.recent_ids.append(token)

    def _write_remembered(self) -> None:
        """Write the remembered token the ring does not hold yet."""
        if self._ring_unwritten is not None:
            index, token = self._ring_unwritten
            self._rule.ring[index] = token
            self._ring_unwritten = None

    def _draw_uniforms(self, rule_calls: int) -> None:
        """This unit's random numbers, drawn up front (so that a token step reads its row on the device): a
        row of two for each of at most `rule_calls` rule calls, whether or not the unit makes them all."""
        if rule_calls > RULE_CALLS_MAX:
            raise ValueError(f"at most {RULE_CALLS_MAX} decode steps per unit, asked for {rule_calls}")
        drawn = draw_uniforms(self.params, self.generator, self.engine.device, rule_calls)
        if self.captured_rule:
            self._rule.uniforms[:rule_calls].copy_(drawn)
        else:
            self._uniforms = drawn

    def evict_positions(self, start: int, end: int, length: int) -> None:
        """KVOperations: drop KV positions [start, end) of this slot and shift the rest left."""
        self.feed_unfed()
        self._model.llm.model.evict(self.slot, start, end, length)
        self.position -= end - start

    def write_positions(self, ids: list[int], start: int) -> None:
        """KVOperations: re-encode token ids at positions [start, start + len(ids)) of this slot."""
        self.feed_unfed()
        self.engine.llm_runner(self._embed(ids), start, self.slot)

    # --------------------------------------------------------------------------------------- prepare
    @torch.no_grad()
    def prepare(self, system_prompt: str, settings: SessionSettings, ref_audio: np.ndarray | None,
                tts_ref_audio: np.ndarray | None) -> PrepareResult:
        """Reset the session and prefill the protected system block (MODEL.md §3.2) in one forward.

        `ref_audio` (16 kHz) becomes voice embeddings inside the audio span (the engine's default voice
        when None); `tts_ref_audio` (falls back to the voice) initialises the vocoder stream.
        """
        self._require_open()
        self.prepared = False
        self._reset(settings)
        voice = ref_audio if ref_audio is not None else self.engine.default_voice
        head_text = f"system\n{system_prompt}\n"
        head_ids = [tokens.IM_START, *self.engine.tokenizer.encode(head_text), tokens.AUDIO_START]
        self._check_prompt_fits(len(head_ids) + 2)  # before embedding a prompt that may be huge
        parts = [self._embed(head_ids)]
        if voice is not None and voice.size:
            voice_embeds = self.audio_encoder.encode_offline(voice)
            parts.append(voice_embeds.reshape(1, -1, voice_embeds.shape[-1]).to(self._model.llm_dtype))
        parts.append(self._embed([tokens.AUDIO_END, tokens.IM_END]))
        self._check_prompt_fits(sum(part.shape[1] for part in parts))
        self._forward(torch.cat(parts, dim=1))
        self.ledger.set_prefix(self.position, self.engine.tokenizer.encode(PREVIOUS_HEADER))
        if settings.generate_audio:
            vocoder_voice = tts_ref_audio if tts_ref_audio is not None else voice
            self.vocoder = self.engine.token2wav.new_stream(vocoder_voice, slot=self.slot)
        self.prepared = True
        prompt = f"<|im_start|>{head_text}<|audio_start|><|audio_end|><|im_end|>"
        return PrepareResult(prompt_length=len(prompt), prompt_tokens=self.position)

    def _check_prompt_fits(self, length: int) -> None:
        cap = self.ledger.limits.cap
        if length > cap:
            raise PromptTooLong(f"the system prompt and voice take {length} KV positions; this session holds "
                                f"at most {cap}")

    # ------------------------------------------------------------------------------------------ audio
    def push_audio(self, samples: np.ndarray) -> None:
        """Append validated float32 16 kHz samples to the session buffer."""
        self.audio_buffer = np.concatenate([self.audio_buffer, np.asarray(samples, dtype=np.float32)])

    def ready_units(self) -> int:
        """Complete units buffered (each needs `unit_chunk_samples` new samples)."""
        return len(self.audio_buffer) // self.engine.cfg.duplex.unit_chunk_samples

    def _take_unit_audio(self) -> np.ndarray:
        size = self.engine.cfg.duplex.unit_chunk_samples
        samples, self.audio_buffer = self.audio_buffer[:size], self.audio_buffer[size:]
        if self.units_run == 0:
            samples = np.concatenate([np.zeros(FIRST_UNIT_SAMPLES - size, dtype=np.float32), samples])
        return samples

    # -------------------------------------------------------------------------------------------- unit
    @torch.no_grad()
    def run_unit(self, frames: list[Image.Image], force_listen: bool = False,
                 max_slice_nums: int | None = None) -> UnitResult:
        """Run one unit on the oldest buffered second of audio plus `frames`.

        Waits for the previous unit's finalize, prefills `<unit>`, vision and audio in one forward,
        generates, synthesises speech, and leaves `[T, </unit>]` pending for `finalize()`.
        """
        self._require_open()
        if not self.prepared:
            raise RuntimeError("run_unit before prepare")
        if self.ready_units() < 1:
            raise RuntimeError("run_unit needs a complete unit of buffered audio")
        self.finalize()
        timer = _Timer(self.engine.device)
        unit_index = self.units_run
        samples = self._take_unit_audio()
        vision_args, slices = self._model.args.vision, max_slice_nums or 1
        with timer.stage("prefill"):
            # The frames' CPU resize runs on the engine's frame thread while the audio is encoded.
            slicing = self.engine.frame_thread.submit(
                lambda: [piece for frame in frames for piece in slice_image(frame, slices, vision_args)])
            image_count = sum(slice_count(frame, slices, vision_args) for frame in frames)
            queries = self._model.args.resampler.queries
            prefill_len = 1 + image_count * (queries + VISION_WRAP_TOKENS) + AUDIO_EMBEDS_PER_UNIT
            if not self.ledger.make_room(prefill_len + self.settings.max_new_speak_tokens_per_chunk + 2, self):
                slicing.result()
                self.units_run += 1
                return self._context_full_result(unit_index, timer)
            with timer.stage("audio"):
                audio_embeds = self.audio_encoder.feed(samples)
            with timer.stage("vision"):
                images = slicing.result()
                vision_embeds = self._model.encode_images(images) if images else None
            start = self.position
            hidden = self._forward(self._prefill_embeds(vision_embeds, audio_embeds))
        with timer.stage("llm"):
            generated = self._generate(hidden[:, -1], unit_index, force_listen)
        kv_length = self.position
        audio, n_codes = self._speak(generated, timer)
        self.units_run += 1
        text = self.engine.tokenizer.decode(generated.text_ids)
        self.pending = _PendingFinalize(
            start=start, index=unit_index, kind="speak" if generated.spoke else "listen",
            fed_ids=generated.fed_ids, terminator=generated.terminator, text=text,
        )
        timer.ms["generate"] = sum(timer.ms.get(k, 0.0) for k in ("llm", "tts", "token2wav"))
        return UnitResult(
            is_listen=not generated.spoke, text=text if generated.spoke else "", audio=audio,
            end_of_turn=generated.end_of_turn, n_tokens=len(generated.text_ids), n_tts_tokens=n_codes,
            kv_cache_length=kv_length, vision_slices=len(images), vision_tokens=len(images) * queries,
            timings_ms=timer.ms, unit_index=unit_index, decode_steps=generated.forwards,
        )

    def _prefill_embeds(self, vision_embeds: torch.Tensor | None, audio_embeds: torch.Tensor) -> torch.Tensor:
        """`<unit> [<image> v </image> (<slice> v </slice>)*] a×10` as one [1, T, H] tensor."""
        parts = [self._embed([tokens.UNIT_START])]
        if vision_embeds is not None:
            for index, image_embeds in enumerate(vision_embeds):
                start_id, end_id = ((tokens.IMAGE_START, tokens.IMAGE_END) if index == 0
                                    else (tokens.SLICE_START, tokens.SLICE_END))
                parts += [self._embed([start_id]), image_embeds[None].to(self._model.llm_dtype),
                          self._embed([end_id])]
        parts.append(audio_embeds.reshape(1, -1, audio_embeds.shape[-1]).to(self._model.llm_dtype))
        return torch.cat(parts, dim=1)

    def _context_full_result(self, unit_index: int, timer: _Timer) -> UnitResult:
        """The unit did not run: the cap leaves no room and the policy cannot free any."""
        return UnitResult(
            is_listen=True, text="", audio=np.zeros(0, dtype=np.float32), end_of_turn=False, n_tokens=0,
            n_tts_tokens=0, kv_cache_length=self.position, vision_slices=0, vision_tokens=0,
            timings_ms=timer.ms, session_end="context_full", unit_index=unit_index,
        )

    # ---------------------------------------------------------------------------------------- generate
    def _forced_listen(self, unit_index: int, force_listen: bool) -> bool:
        if force_listen or unit_index < self.settings.force_listen_count:
            return True
        if self.schedule == "forced":
            return self._forced_cycle_position(unit_index) < FORCED_LISTEN_UNITS
        return False

    @staticmethod
    def _forced_cycle_position(unit_index: int) -> int:
        return unit_index % (FORCED_LISTEN_UNITS + FORCED_SPEAK_UNITS)

    def _scripted_token(self, chosen: int, step: int, max_steps: int, unit_index: int) -> int:
        """Forced schedule: <|speak|>, then the text tokens the decode rule chose, <|turn_eos|> at the end
        of the turn's last unit (the terminator step is forced by the caller)."""
        if step == 0:
            return tokens.SPEAK
        ends_turn = self._forced_cycle_position(unit_index) == FORCED_LISTEN_UNITS + FORCED_SPEAK_UNITS - 1
        if ends_turn and step == max_steps - 2:
            return tokens.TURN_EOS
        return chosen

    def _generate(self, hidden: torch.Tensor, unit_index: int, force_listen: bool) -> _Generated:
        """The per-unit generate loop of MODEL.md §4 (terminators are deferred to finalize).

        `hidden` is the prefill's last post-norm hidden state [1, H]. Every step but a forced terminator runs
        the decode rule, also when the schedule overrides its choice (a forced listen, the forced schedule's
        scripted tokens), so the work per unit does not depend on who decides. A fed token and the next
        step's rule run as one call where they can (`_feed`).
        """
        out = _Generated()
        forced_listen = self._forced_listen(unit_index, force_listen)
        scripted = self.schedule == "forced" and not forced_listen
        if forced_listen and self.turn_open:  # barge-in: close the open turn first
            self._forward(self._embed([tokens.TURN_EOS]))
            out.fed_ids.append(tokens.TURN_EOS)
            out.forwards += 1
            out.end_of_turn = True
            self._end_turn()
        max_steps = self.settings.max_new_speak_tokens_per_chunk
        self._draw_uniforms(max_steps)

        def runs_rule(step: int) -> bool:
            return step < max_steps and (forced_listen or step < max_steps - 1)

        # The rule's choice for the current step (computed by the previous step's feed from the second on).
        chosen = self._next_token(hidden, 0, text_only=scripted) if runs_rule(0) else tokens.CHUNK_EOS
        for step in range(max_steps):
            if not runs_rule(step):
                token = tokens.CHUNK_EOS
            else:
                token = chosen
                if forced_listen:
                    token = tokens.LISTEN
                elif scripted:
                    token = self._scripted_token(token, step, max_steps, unit_index)
            if token == tokens.LISTEN and self.turn_open:
                token = tokens.TTS_BOS  # a turn only ends via <|turn_eos|>
            self._remember(token)
            if token in tokens.UNIT_TERMINATORS:
                out.terminator = token
                break
            is_text = not tokens.is_control(token)
            max_tokens = self.settings.max_tokens
            if is_text and max_tokens is not None and self.turn_text_tokens >= max_tokens:
                token, is_text = tokens.TURN_EOS, False  # the turn's text budget is spent
            if is_text and not scripted:
                candidate = self.engine.tokenizer.decode([*out.text_ids, token])
                if len(candidate) >= MAX_UNIT_TEXT_CHARS:
                    out.terminator = tokens.CHUNK_EOS
                    break
            hidden, chosen = self._feed(token, step + 1 if runs_rule(step + 1) else None, text_only=scripted)
            out.fed_ids.append(token)
            out.forwards += 1
            out.spoke = True
            if token == tokens.TURN_EOS:
                out.end_of_turn = True
                self.turn_open = False
            else:
                self.turn_open = True
            if is_text:
                out.text_ids.append(token)
                out.text_hidden.append(hidden[0])
                self.turn_text_tokens += 1
        out.spoke = out.spoke or self.turn_open  # an open turn keeps speaking even with nothing new fed
        return out

    # ------------------------------------------------------------------------------------ TTS + vocoder
    def _speak(self, generated: _Generated, timer: _Timer) -> tuple[np.ndarray, int]:
        """TTS codes and 24 kHz audio of a speaking unit; handles the end of the turn. (audio, codes)."""
        empty = np.zeros(0, dtype=np.float32)
        if not generated.spoke:
            return empty, 0
        audio, codes = empty, []
        if self.settings.generate_audio:
            tts = self._model.tts
            with timer.stage("tts"):
                with timer.stage("tts_prep"):
                    condition = self._tts_condition(generated)
                first_or_last = self.turn_speaking_units == 0 or generated.end_of_turn
                if self.schedule == "forced":
                    min_new = max_new = FORCED_TTS_CODES
                else:
                    min_new, max_new = (0 if first_or_last else TTS_CODES_PER_UNIT), TTS_CODES_PER_UNIT
                if self.tts_position + condition.shape[1] + max_new > tts.model.cache_max_len:
                    self.tts_position = 0  # a very long turn: restart the TTS context
                codes, self.tts_position = tts.generate_codes(
                    condition, self.slot, self.tts_position, self.settings.tts_temperature, min_new, max_new,
                    self.generator, backbone=self.engine.tts_runner, steps=self._code_steps(),
                )
            with timer.stage("token2wav"):
                pieces = [self.vocoder.push(codes)]
                if generated.end_of_turn:
                    pieces.append(self.vocoder.flush())
                audio = np.concatenate(pieces).astype(np.float32, copy=False)
            if not generated.end_of_turn and audio.size < OUTPUT_SAMPLE_RATE:
                audio = np.concatenate([np.zeros(OUTPUT_SAMPLE_RATE - audio.size, dtype=np.float32), audio])
        self.turn_speaking_units += 1
        if generated.end_of_turn:
            self._end_turn()
        return audio, len(codes)

    def _code_steps(self) -> CodeStepper:
        """How the TTS code loop steps: the engine's token steps, else the runner and the captured head (if
        any) one step at a time."""
        engine = self.engine
        if engine.tts_steps is not None:
            return engine.tts_steps
        return CodeSteps(self._model.tts, engine.tts_runner, engine.heads.tts if engine.heads is not None else None)

    def _tts_condition(self, generated: _Generated) -> torch.Tensor:
        tts = self._model.tts
        text_ids = torch.tensor(generated.text_ids, dtype=torch.long, device=self.engine.device)
        if generated.text_hidden:
            hidden = torch.stack(generated.text_hidden)
        else:
            hidden = torch.zeros(0, tts.args.llm_dim, device=self.engine.device)
        return tts.build_condition(text_ids, hidden)

    def _end_turn(self) -> None:
        """Close the turn: the TTS context restarts and the vocoder returns to its turn-start state.

        At a natural end the caller has flushed the vocoder first; a barge-in drops pending speech.
        """
        self.turn_open = False
        self.turn_text_tokens = 0
        self.turn_speaking_units = 0
        self.tts_position = 0
        if self.vocoder is not None:
            self.vocoder.reset_turn()

    # ---------------------------------------------------------------------------------------- finalize
    @torch.no_grad()
    def finalize(self) -> None:
        """Reserve the pending `[T, </unit>]` (fed by the next forward), record the unit and apply the
        context policy. Idempotent."""
        pending = self.pending
        if pending is None:
            return
        start_time = time.perf_counter()
        self.pending = None
        self.unfed_ids = [pending.terminator, tokens.UNIT_END]
        self.position += len(self.unfed_ids)
        self.ledger.record(UnitRecord(
            index=pending.index, length=self.position - pending.start, kind=pending.kind,
            ids=[*pending.fed_ids, pending.terminator, tokens.UNIT_END], text=pending.text,
        ))
        self.ledger.after_finalize(self)
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize()
        self.last_finalize_ms = (time.perf_counter() - start_time) * 1000.0

    # ------------------------------------------------------------------------------------------- close
    def close(self) -> None:
        """Free the KV slot and drop the TTS/vocoder/audio state. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.pending = None
        self.vocoder = None
        self.audio_buffer = np.zeros(0, dtype=np.float32)
        self.engine.release_slot(self.slot)

    def _require_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"session {self.session_id} is closed")
