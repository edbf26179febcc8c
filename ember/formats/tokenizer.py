"""Tokenizers from GGUF metadata: byte-level BPE (`gpt2`) and SentencePiece (`llama`), plus a
streaming detokenizer that only emits complete UTF-8.

Encoding is done by the HF `tokenizers` library, configured to behave like llama.cpp:
- special tokens are cut out of the text first, longest match first: control tokens only when
  `special=True`, user-defined tokens always (llama.cpp's `tokenizer_st_partition`);
- `gpt2` models split each remaining piece with the pre-tokenizer regexes llama.cpp uses for the
  file's `tokenizer.ggml.pre`, then run byte-level BPE with the file's merges;
- `llama` (SentencePiece) models turn spaces into `▁` and merge pieces by score; the merge list is
  derived from the scores (the pair whose merged piece scores highest goes first), with `<0xNN>` byte
  fallback. The derived list is cached under $EMBER_HOME, keyed by a hash of the vocabulary.

Decoding is ember's own: a table of the bytes of every token, joined and decoded.
"""

from __future__ import annotations

import hashlib
import io
from functools import cached_property

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import FormatError, UnsupportedError
from ..home import cache_dir, write_atomic
from .gguf import GGUFFile

# token_type values in GGUF
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's pre-tokenizer regexes by `tokenizer.ggml.pre`, applied in sequence; each match and
# each gap between matches becomes its own piece.
_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    # name: (regexes, ignore_merges)
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_WORDS, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    "gpt-2": ((_GPT2_WORDS,), False),
    "smollm": ((r"\p{N}", _GPT2_WORDS), False),
    "starcoder": ((r"\p{N}", _GPT2_WORDS), False),
    "qwen2": ((_QWEN2,), False),
    "llama-bpe": ((_LLAMA3,), True),
    "llama3": ((_LLAMA3,), True),
}

_CACHE_VERSION = b"ember-tokenizer-1"


def bytes_to_unicode() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte value, indexed by the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return tuple(chr(table[b]) for b in range(256))


class Tokenizer:
    """Encode text to token ids and back, as llama.cpp does for the same GGUF file."""

    def __init__(self, gguf: GGUFFile):
        self.path = gguf.path
        self.model = gguf.get("tokenizer.ggml.model")
        if self.model is None:
            raise FormatError(f"{gguf.path}: no tokenizer in this file (tokenizer.ggml.model is missing)")
        if self.model not in ("gpt2", "llama"):
            raise UnsupportedError(
                f"tokenizer model {self.model!r} is not supported "
                "(ember knows 'gpt2' byte-level BPE and 'llama' SentencePiece)"
            )
        tokens = gguf.get("tokenizer.ggml.tokens")
        if tokens is None or len(tokens) == 0:
            raise FormatError(f"{gguf.path}: tokenizer.ggml.tokens is missing or empty")
        self._tokens = tokens
        self.n_vocab = len(tokens)
        types = gguf.get("tokenizer.ggml.token_type")
        if types is None:
            types = np.full(self.n_vocab, NORMAL, dtype=np.int32)
        if len(types) != self.n_vocab:
            raise FormatError(f"{gguf.path}: {len(types)} token types for {self.n_vocab} tokens")
        self.token_types = np.asarray(types, dtype=np.int32)
        self.pre = gguf.get("tokenizer.ggml.pre", "default")
        self.bos_id = self._token_id(gguf, "bos")
        self.eos_id = self._token_id(gguf, "eos")
        self.eot_id = self._token_id(gguf, "eot")
        self.eom_id = self._token_id(gguf, "eom")
        self.add_bos = bool(gguf.get("tokenizer.ggml.add_bos_token", self.model == "llama"))
        self.add_space_prefix = bool(gguf.get("tokenizer.ggml.add_space_prefix", self.model == "llama"))
        self._gguf = gguf

    def _token_id(self, gguf: GGUFFile, which: str) -> int | None:
        v = gguf.get(f"tokenizer.ggml.{which}_token_id")
        if v is None:
            return None
        if not 0 <= int(v) < self.n_vocab:
            raise FormatError(f"{gguf.path}: {which} token id {v} is outside the vocabulary of {self.n_vocab}")
        return int(v)

    # ---- vocabulary ----------------------------------------------------------------------
    @property
    def tokens(self) -> list[str]:
        return self._tokens.tolist()

    def token_to_id(self, text: str) -> int | None:
        return self._hf.token_to_id(text)

    @cached_property
    def _vocab(self) -> dict[str, int]:
        """Token text -> id; a text listed twice maps to its first id (built back to front, so
        the first id is the one written last)."""
        tokens = self.tokens
        return dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))

    @cached_property
    def stop_ids(self) -> frozenset[int]:
        """Tokens that end a generation: EOS, EOT/EOM, and control tokens named like end-of-turn."""
        ids = {i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None}
        for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>", "<|end|>", "<|eom_id|>"):
            i = self.token_to_id(name)
            if i is not None and self.token_types[i] == CONTROL:
                ids.add(i)
        return frozenset(ids)

    # ---- encoding ------------------------------------------------------------------------
    @cached_property
    def _hf(self) -> HFTokenizer:
        """The encoder: built from the file's vocabulary once, then read back from its saved
        form (`tokenizers`' own JSON, in the cache folder): built from Python's copies of a 151k
        vocabulary it held 80 MB, read back 51 (Qwen2.5)."""
        saved = self._saved_path()
        try:
            return HFTokenizer.from_file(str(saved))
        except Exception:  # absent, unreadable or from another tokenizers version: built anew
            pass
        hf = self._build_bpe() if self.model == "gpt2" else self._build_spm()
        specials, tokens = [], self.tokens
        for i in np.flatnonzero((self.token_types == CONTROL) | (self.token_types == USER_DEFINED)).tolist():
            if tokens[i]:
                specials.append(AddedToken(tokens[i], special=bool(self.token_types[i] == CONTROL), normalized=False))
        hf.add_tokens(specials)
        try:
            write_atomic(saved, hf.to_str(), fsync=False)
        except OSError:
            pass  # a cache we cannot write only makes the next start slower
        return hf

    def _saved_path(self):
        """Where the encoder built from this file's tokenizer is saved: named by a hash of
        everything it is built from."""
        key = hashlib.sha256(_CACHE_VERSION + b"|hf|" + f"{self.model}|{self.pre}|{self.add_space_prefix}".encode())
        key.update(tokenizers.__version__.encode())
        key.update(self._tokens.raw_region())
        key.update(self.token_types.tobytes())
        for name in ("tokenizer.ggml.merges", "tokenizer.ggml.scores"):
            v = self._gguf.get(name)
            if v is not None:
                key.update(v.raw_region() if hasattr(v, "raw_region") else np.ascontiguousarray(v).tobytes())
        return cache_dir("tokenizers") / f"hf-{key.hexdigest()[:32]}.json"

    def _build_bpe(self) -> HFTokenizer:
        if self.pre not in PRE_TOKENIZERS:
            raise UnsupportedError(
                f"pre-tokenizer {self.pre!r} is not supported; known: {', '.join(sorted(PRE_TOKENIZERS))}"
            )
        regexes, ignore_merges = PRE_TOKENIZERS[self.pre]
        raw_merges = self._gguf.get("tokenizer.ggml.merges")
        if raw_merges is None:
            raise FormatError(f"{self.path}: a gpt2 tokenizer needs tokenizer.ggml.merges, which is missing")
        merges = split_merges(raw_merges.tolist(), self.path)
        hf = HFTokenizer(models.BPE(vocab=self._vocab, merges=merges, ignore_merges=ignore_merges))
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        return hf

    def _build_spm(self) -> HFTokenizer:
        scores = self._gguf.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != self.n_vocab:
            raise FormatError(
                f"{self.path}: a SentencePiece tokenizer needs one score per token in tokenizer.ggml.scores"
            )
        unk = self._token_id(self._gguf, "unknown")
        hf = HFTokenizer(
            models.BPE(
                vocab=self._vocab,
                merges=self._spm_merges(np.asarray(scores, dtype=np.float32)),
                unk_token=self.tokens[unk] if unk is not None else None,
                byte_fallback=True,
                fuse_unk=True,
            )
        )
        steps = [normalizers.Replace(" ", "▁")]
        if self.add_space_prefix:
            steps.insert(0, normalizers.Prepend(" "))
        hf.normalizer = normalizers.Sequence(steps)
        return hf

    def _spm_merges(self, scores: np.ndarray) -> list[tuple[str, str]]:
        """Every split of a normal piece into two known pieces, best-scoring merged piece first."""
        key = hashlib.sha256(_CACHE_VERSION + np.ascontiguousarray(scores).tobytes())
        key.update(self._tokens.raw_region())
        key.update(self.token_types.tobytes())
        cache = cache_dir("tokenizers") / f"spm-merges-{key.hexdigest()[:32]}.npy"
        tokens = self.tokens
        try:
            pairs = np.load(cache, allow_pickle=False)
            if (
                pairs.ndim == 2
                and pairs.shape[1] == 2
                and pairs.size
                and 0 <= pairs.min()
                and pairs.max() < self.n_vocab
            ):
                return [(tokens[a], tokens[b]) for a, b in pairs.tolist()]
        except (OSError, ValueError):
            pass
        vocab, types = self._vocab, self.token_types
        normal = {s for s, i in vocab.items() if types[i] == NORMAL}
        found = []
        for i, piece in enumerate(tokens):
            if types[i] != NORMAL or len(piece) < 2:
                continue
            for k in range(1, len(piece)):
                left, right = piece[:k], piece[k:]
                if left in normal and right in normal:
                    found.append((-float(scores[i]), vocab[left], vocab[right]))
        found.sort()
        pairs = np.array([f[1:] for f in found], dtype=np.int32).reshape(-1, 2)
        buf = io.BytesIO()
        np.save(buf, pairs, allow_pickle=False)
        try:
            write_atomic(cache, buf.getvalue(), fsync=False)
        except OSError:
            pass  # a cache we cannot write only makes the next start slower
        return [(tokens[a], tokens[b]) for a, b in pairs.tolist()]

    def encode(self, text: str, special: bool = True, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. special: parse control-token text such as <|im_start|> as the token.
        add_bos: prepend BOS (default: what the file's metadata asks)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        hf = self._hf
        hf.encode_special_tokens = not special
        ids = hf.encode(text, add_special_tokens=False).ids if text else []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    # ---- decoding ------------------------------------------------------------------------
    @cached_property
    def _piece_cache(self) -> tuple[dict[int, bytes], dict[int, bytes]]:
        return {}, {}

    @cached_property
    def _byte_table(self) -> dict[int, int]:
        return {ord(ch): b for b, ch in enumerate(bytes_to_unicode())}

    def _piece(self, i: int, special: bool) -> bytes:
        """Bytes of token i (control tokens as their text when special, else empty), made on
        first use: building all of them up front cost 0.14 s of the first generated token."""
        cache = self._piece_cache[0 if special else 1]
        p = cache.get(i)
        if p is None:
            t = int(self.token_types[i])
            if t == CONTROL and not special:
                p = b""
            else:
                p = self._make_piece(self._tokens[i], t)
            cache[i] = p
        return p

    def _make_piece(self, s: str, t: int) -> bytes:
        if self.model == "gpt2":
            if t == NORMAL or t == UNUSED:
                try:
                    return s.translate(self._byte_table).encode("latin-1")
                except UnicodeEncodeError:
                    return s.encode("utf-8")
            return s.encode("utf-8")
        if t == BYTE and len(s) == 6 and s.startswith("<0x"):
            return bytes([int(s[3:5], 16)])
        if t == NORMAL or t == UNUSED:
            return s.replace("▁", " ").encode("utf-8")
        if t == UNKNOWN:
            return "▅".encode()
        return s.encode("utf-8")

    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        self._check_id(token_id)
        return self._piece(token_id, special)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.n_vocab:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.n_vocab - 1})")

    def decode_bytes(self, ids, special: bool = True) -> bytes:
        n, piece = self.n_vocab, self._piece
        return b"".join([piece(i, special) if 0 <= i < n else _raise_id(i, n) for i in ids])

    def decode(self, ids, special: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 (a token sequence cut inside a character) becomes U+FFFD."""
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")

    def stream(self, special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, special)


def split_merges(raw: list[str], path) -> list[tuple[str, str]]:
    """BPE merges "a b" -> ("a", "b"), split at the first space. Fast path: all merges joined by
    spaces and split at once, kept when every pair's lengths plus the space make its merge's length
    (no merge lacked its space while another had two); else merge by merge."""
    halves = " ".join(raw).split(" ")
    if len(halves) == 2 * len(raw):
        lens = np.fromiter(map(len, halves), np.int64, len(halves))
        if np.array_equal(lens[::2] + lens[1::2] + 1, np.fromiter(map(len, raw), np.int64, len(raw))):
            return list(zip(halves[::2], halves[1::2]))
    merges = []
    for m in raw:
        a, sep, b = m.partition(" ")
        if not sep:
            raise FormatError(f"{path}: malformed merge {m!r} (expected two tokens separated by a space)")
        merges.append((a, b))
    return merges


def _raise_id(i: int, n: int) -> bytes:
    raise ValueError(f"token id {i} is outside the vocabulary (0..{n - 1})")


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back bytes of an unfinished character."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self._tok = tokenizer
        self._special = special
        self._pending = b""

    def feed(self, ids) -> str:
        data = self._pending + self._tok.decode_bytes(ids, self._special)
        cut = _complete_utf8_prefix(data)
        self._pending = data[cut:]
        return data[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        data, self._pending = self._pending, b""
        return data.decode("utf-8", errors="replace")


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 sequence."""
    n = len(data)
    # look back at most 3 bytes for the start of an unfinished multi-byte character
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b < 0x80:
            return n  # ASCII: everything before is complete
        if b >= 0xC0:  # a lead byte
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return n if back >= need else n - back
    return n  # only continuation bytes: invalid anyway; let the decoder replace them
