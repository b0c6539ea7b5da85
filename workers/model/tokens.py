"""Special token ids of MiniCPM-o 4.5 (MODEL.md §3.1). Identical in every preset."""

IM_START = 151644
IM_END = 151645
ENDOFTEXT = 151643  # pad
UNIT_START = 151683  # <unit>
UNIT_END = 151684  # </unit>
IMAGE_START = 151669
IMAGE_END = 151670
SLICE_START = 151679
SLICE_END = 151680
AUDIO_START = 151697  # <|audio_start|>
AUDIO_END = 151699  # <|audio_end|>
SPEAK = 151706
LISTEN = 151705
CHUNK_EOS = 151718
CHUNK_TTS_EOS = 151721
TURN_EOS = 151717
TTS_BOS = 151703
TTS_PAD = 151722
TTS_EOS = 151704
INTERRUPT = 151707
THINK_START = 151667
THINK_END = 151668

# Ends a unit; deferred to finalize (fed together with </unit>).
UNIT_TERMINATORS = frozenset({LISTEN, CHUNK_EOS, CHUNK_TTS_EOS})

# All added tokens (151643 .. 151747) are control tokens: never spoken, never passed to TTS as text.
FIRST_ADDED_TOKEN = 151643
LAST_ADDED_TOKEN = 151747

# Named added tokens for the built-in fallback tokenizer (ids 151643..151747).
NAMED_ADDED_TOKENS: dict[int, str] = {
    ENDOFTEXT: "<|endoftext|>",
    IM_START: "<|im_start|>",
    IM_END: "<|im_end|>",
    THINK_START: "<think>",
    THINK_END: "</think>",
    IMAGE_START: "<image>",
    IMAGE_END: "</image>",
    SLICE_START: "<slice>",
    SLICE_END: "</slice>",
    UNIT_START: "<unit>",
    UNIT_END: "</unit>",
    AUDIO_START: "<|audio_start|>",
    151698: "<|audio|>",
    AUDIO_END: "<|audio_end|>",
    151700: "<|spk_bos|>",
    151701: "<|spk|>",
    151702: "<|spk_eos|>",
    TTS_BOS: "<|tts_bos|>",
    TTS_EOS: "<|tts_eos|>",
    LISTEN: "<|listen|>",
    SPEAK: "<|speak|>",
    INTERRUPT: "<|interrupt|>",
    151708: "<|vad_start|>",
    151709: "<|vad_end|>",
    151716: "<|turn_bos|>",
    TURN_EOS: "<|turn_eos|>",
    CHUNK_EOS: "<|chunk_eos|>",
    151719: "<|chunk_bos|>",
    151720: "<|chunk_tts_bos|>",
    CHUNK_TTS_EOS: "<|chunk_tts_eos|>",
    TTS_PAD: "<|tts_pad|>",
}


def is_control(token_id: int) -> bool:
    return FIRST_ADDED_TOKEN <= token_id <= LAST_ADDED_TOKEN
