"""Output text, decoded incrementally: a round decodes only each request's newest tokens.

Decoding a request's whole output every round costs O(length) per round, O(n^2) over a reply, and
one tokenizer call per request: at 256 requests with a tiny model that was ~9 ms of host time per
round, more than a GPU spends on the round's forward. As vLLM and TGI do, each request keeps two
offsets into its output ids: the text of ids[prefix:read] was emitted; the text of ids[prefix:]
beyond it is new, and is taken only when it does not end in an incomplete UTF-8 character (which
decodes to U+FFFD), otherwise it waits for the next token. Decoding from `prefix` rather than `read`
gives a tokenizer that drops the leading space of a string (SentencePiece) the context it needs;
for byte-level BPE (SmolLM2, Qwen3) the pieces concatenate to the whole decode exactly. All requests
of a round are decoded in one batched call to the Rust tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DecodeState:
    text: str = ""      # complete characters decoded so far
    pending: str = ""   # decoded ids after `read`, held back: they end in an incomplete character
    prefix: int = 0     # output ids [prefix, read) are the ones whose text was emitted last
    read: int = 0

    @property
    def full_text(self) -> str:
        """What decoding every output id at once gives (U+FFFD for an incomplete last character)."""
        return self.text + self.pending

    @property
    def settled_text(self) -> str:
        """`full_text` less its last character while that may be an incomplete one (the U+FFFD that
        ends `pending`): text no later token can change. A stop string "\ufffd" must not match a
        character that the next token completes."""
        return self.text + self.pending[:-1]


class Detokenizer:
    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._decode_batch = lambda seqs: backend.decode_batch(seqs, skip_special_tokens=True)
        else:   # a slow (Python) tokenizer
            self._decode_batch = lambda seqs: tokenizer.batch_decode(seqs, skip_special_tokens=True,
                                                                    clean_up_tokenization_spaces=False)

    def update(self, items: list[tuple[DecodeState, list[int]]]) -> None:
        """Advance each state over its output ids (which only ever grow)."""
        windows = []
        for state, ids in items:
            windows += [ids[state.prefix:state.read], ids[state.prefix:]]
        texts = self._decode_batch(windows) if windows else []
        for i, (state, ids) in enumerate(items):
            new = texts[2 * i + 1][len(texts[2 * i]):]
            if new and not new.endswith("\ufffd"):
                state.text += new
                state.pending = ""
                state.prefix, state.read = state.read, len(ids)
            else:
                state.pending = new
