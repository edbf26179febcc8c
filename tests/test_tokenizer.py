"""Tokenizers against llama.cpp's ids on the reference prompts, and the streaming detokenizer."""

import random

import pytest
from conftest import REFERENCES, reference

from ember.errors import FormatError
from ember.formats.tokenizer import Tokenizer, _complete_utf8_prefix, split_merges

MODELS = list(REFERENCES)


@pytest.mark.parametrize("name", MODELS)
def test_prompt_ids_equal_llama_cpp(catalog_model, name):
    tok = catalog_model(name).tokenizer
    ref = reference(name)
    for p in ref["prompts"]:
        ids = tok.encode(p["text"], special=p["parse_special"], add_bos=p["add_bos"])
        assert ids == p["prompt_token_ids"], p["name"]


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_strings_equal_llama_cpp(catalog_model, name):
    tok = catalog_model(name).tokenizer
    for case in reference(name)["tokenizer_only"]:
        assert tok.encode(case["text"], special=True) == case["ids_parse_special"], case["text"]
        assert tok.encode(case["text"], special=False) == case["ids_no_parse_special"], case["text"]


@pytest.mark.parametrize("name", MODELS)
def test_the_saved_encoder_encodes_as_llama_cpp(catalog_model, name):
    """After its first build the encoder is read back from its saved form (less memory): the
    same ids as llama.cpp's, the same stop tokens."""
    gguf = catalog_model(name).gguf
    built = Tokenizer(gguf)
    built.encode("x")  # built (or read back) and saved
    tok = Tokenizer(gguf)
    assert tok._saved_path() == built._saved_path() and tok._saved_path().exists()
    ref = reference(name)
    for p in ref["prompts"]:
        assert tok.encode(p["text"], special=p["parse_special"], add_bos=p["add_bos"]) == p["prompt_token_ids"]
    for case in ref["tokenizer_only"]:
        assert tok.encode(case["text"], special=True) == case["ids_parse_special"], case["text"]
        assert tok.encode(case["text"], special=False) == case["ids_no_parse_special"], case["text"]
    assert tok.stop_ids == built.stop_ids and tok.stop_ids


@pytest.mark.parametrize("name", MODELS)
def test_perplexity_text_ids_equal_llama_cpp(catalog_model, name, ppl_text):
    tok = catalog_model(name).tokenizer
    ppl = reference(name)["perplexity"]
    assert tok.encode(ppl_text, special=False, add_bos=ppl["add_bos"]) == ppl["token_ids"]


@pytest.mark.parametrize("name", MODELS)
def test_decode_round_trips(catalog_model, name, ppl_text):
    tok = catalog_model(name).tokenizer
    texts = [p["text"] for p in reference(name)["prompts"]] + [c["text"] for c in reference(name)["tokenizer_only"]]
    for text in texts + [ppl_text]:
        ids = tok.encode(text, special=True, add_bos=False)
        assert tok.decode(ids, special=True) == text


@pytest.mark.parametrize("name", MODELS)
def test_special_tokens_hidden_unless_asked(catalog_model, name):
    tok = catalog_model(name).tokenizer
    eos = tok.eos_id
    assert tok.decode([eos], special=False) == ""
    assert tok.decode([eos], special=True) == tok.tokens[eos]
    assert eos in tok.stop_ids


@pytest.mark.parametrize("name", MODELS)
def test_stream_decoder_equals_decode_for_any_split(catalog_model, name):
    tok = catalog_model(name).tokenizer
    text = "Ελληνικά, русский, 한국어 ภาษาไทย 🐍🎉 👩‍💻 naïve café"
    ids = tok.encode(text, add_bos=False)
    rng = random.Random()
    for _ in range(20):
        dec = tok.stream()
        out, i = [], 0
        while i < len(ids):
            k = rng.randint(1, 3)
            piece = dec.feed(ids[i : i + k])
            assert "\ufffd" not in piece  # never half a character
            out.append(piece)
            i += k
        out.append(dec.flush())
        assert "".join(out) == text


def test_complete_utf8_prefix():
    for s in ["a", "é", "한", "🐍", "x🐍y"]:
        b = s.encode()
        for cut in range(len(b) + 1):
            n = _complete_utf8_prefix(b[:cut])
            b[:n].decode("utf-8")  # the prefix is always whole characters
            assert n >= cut - 3


def test_split_merges():
    assert split_merges(["Ġ t", "h e", "a b c"], "m") == [("Ġ", "t"), ("h", "e"), ("a", "b c")]
    assert split_merges([], "m") == []
    for bad in (["ab", "c d e"], ["a b", "cd"], ["a b c", "de"]):
        with pytest.raises(FormatError, match="malformed merge"):
            split_merges(bad, "m")


def test_vocab_maps_a_repeated_text_to_its_first_id():
    class Stub:
        tokens = ["a", "b", "a", "c", "b"]

    assert Tokenizer.__dict__["_vocab"].func(Stub()) == {"a": 0, "b": 1, "c": 3}


def test_bad_token_ids_raise(catalog_model):
    tok = catalog_model("smollm2-135m").tokenizer
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.n_vocab])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])


def test_empty_text(catalog_model):
    assert catalog_model("smollm2-135m").tokenize("") == []
    g = catalog_model("gemma3-270m")
    assert g.tokenize("") == [g.tokenizer.bos_id]
