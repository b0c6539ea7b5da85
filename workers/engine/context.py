"""The unit ledger of one session's LLM KV cache and the context policies (MODEL.md §5).

Layout of a slot: the protected prefix (system block, never evicted), then whole units, each recorded
here once finalized with its length, kind, fed token ids and text. The prefix ends with the "previous"
block `[header previous-text] <|audio_end|> <|im_end|>` (just the two closing tokens until the `context`
policy writes text into it). A hard cap (`min(duplex.max_kv_tokens, settings.max_kv_tokens)`) bounds the
slot, and the policy keeps a session under it:

* `sliding`: after a finalize that leaves more than `high` positions, and before a unit that would not
  fit under the cap, evict the oldest whole units down to `low` positions (lower when the next unit
  needs it) in one `evict` call, which re-rotates the kept keys so positions stay contiguous;
* `context`: keep at most `max_units` units (and drop more when the next unit would not fit): the
  text of dropped units is appended to the previous block, trimmed to its last `previous_tokens`
  tokens; the block is re-encoded by one forward and the kept units' KV is reused with re-rotated keys
  (an approximation, as in the reference);
* `none`: never evict.

When the policy cannot make room for the next unit, the session ends with `context_full`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

from workers.model import tokens

PolicyName = Literal["sliding", "context", "none"]
PREFIX_SUFFIX_IDS = (tokens.AUDIO_END, tokens.IM_END)


@dataclass
class UnitRecord:
    """One finalized unit in the KV cache."""

    index: int
    length: int  # KV positions, from <unit> to </unit> inclusive
    kind: Literal["listen", "speak"]
    ids: list[int]  # token ids fed during generate and finalize (embeddings are not listed)
    text: str


@dataclass(frozen=True)
class PolicyLimits:
    """Thresholds of one session, already clamped to its cap."""

    cap: int
    high: int
    low: int
    max_units: int
    previous_tokens: int

    @classmethod
    def clamp(cls, cap: int, high: int, low: int, max_units: int, previous_tokens: int) -> PolicyLimits:
        """Scale the sliding thresholds down proportionally when the cap is below `high`."""
        if high > cap:
            low, high = low * cap // high, cap
        return cls(cap=cap, high=high, low=low, max_units=max_units, previous_tokens=previous_tokens)


class KVOperations(Protocol):
    """What a policy may do to the session's KV slot."""

    def evict_positions(self, start: int, end: int, length: int) -> None:
        """Drop positions [start, end) and shift [end, length) left (keys re-rotated)."""

    def write_positions(self, ids: list[int], start: int) -> None:
        """Encode token ids at positions [start, start + len(ids)), attending to the positions before."""


@dataclass
class PreviousBlock:
    """The `context` policy's block at the end of the prefix: `header + text_ids`, then the suffix."""

    start: int = 0  # first position of the block
    header_ids: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)

    def ids(self) -> list[int]:
        text = [*self.header_ids, *self.text_ids] if self.text_ids else []
        return [*text, *PREFIX_SUFFIX_IDS]


class KVLedger:
    """Units of one KV slot after the protected prefix, and the policy that trims them."""

    def __init__(self, policy: PolicyName, limits: PolicyLimits) -> None:
        self.policy = policy
        self.limits = limits
        self.prefix_length = 0
        self.units: deque[UnitRecord] = deque()
        self.previous = PreviousBlock()

    @property
    def length(self) -> int:
        """KV positions covered by the prefix and the finalized units."""
        return self.prefix_length + sum(unit.length for unit in self.units)

    def set_prefix(self, length: int, previous_header_ids: list[int]) -> None:
        """The prefix was written up to `length`, ending with the two suffix tokens."""
        self.prefix_length = length
        self.units.clear()
        self.previous = PreviousBlock(start=length - len(PREFIX_SUFFIX_IDS), header_ids=previous_header_ids)

    def record(self, unit: UnitRecord) -> None:
        self.units.append(unit)

    def after_finalize(self, kv: KVOperations) -> int:
        """Apply the policy's trigger; returns the number of positions removed."""
        if self.policy == "sliding" and self.length > self.limits.high:
            return self._evict_oldest(self.limits.low, kv)
        if self.policy == "context" and len(self.units) > self.limits.max_units:
            return self._drop_into_previous(len(self.units) - self.limits.max_units, kv)
        return 0

    def make_room(self, needed: int, kv: KVOperations) -> bool:
        """Ensure `needed` more positions fit under the cap (per the policy); False if impossible."""
        if self.policy == "sliding" and self.length + needed > self.limits.cap:
            self._evict_oldest(min(self.limits.low, self.limits.cap - needed), kv)
        while self.policy == "context" and self.length + needed > self.limits.cap and self.units:
            self._drop_into_previous(1, kv)
        return self.length + needed <= self.limits.cap

    def _evict_oldest(self, target_length: int, kv: KVOperations) -> int:
        """Evict whole oldest units until the length is <= target."""
        length = self.length
        removed = 0
        while self.units and length - removed > target_length:
            removed += self.units.popleft().length
        if removed:
            kv.evict_positions(self.prefix_length, self.prefix_length + removed, length)
        return removed

    def _drop_into_previous(self, count: int, kv: KVOperations) -> int:
        """Drop the `count` oldest units (more if the grown block would not fit in the freed span), move
        their text into the previous block, shift the kept units left and re-encode the block."""
        length = self.length
        old_end = self.prefix_length  # end of the span [block start, old_end) that gets replaced
        text_ids = list(self.previous.text_ids)
        block = PreviousBlock(self.previous.start, self.previous.header_ids, text_ids)  # shares text_ids
        dropped = 0
        while self.units and (dropped < count or block.start + len(block.ids()) > old_end):
            unit = self.units.popleft()
            old_end += unit.length
            dropped += 1
            text_ids.extend(i for i in unit.ids if not tokens.is_control(i))
            del text_ids[:max(0, len(text_ids) - self.limits.previous_tokens)]
        overflow = block.start + len(block.ids()) - old_end
        if overflow > 0:  # no unit left to drop: keep less previous text
            del text_ids[:overflow]
        new_prefix = block.start + len(block.ids())
        kv.evict_positions(new_prefix, old_end, length)
        if block.ids() != self.previous.ids():
            kv.write_positions(block.ids(), block.start)
        self.previous = block
        self.prefix_length = new_prefix
        return old_end - new_prefix
