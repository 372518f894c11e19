"""TextStream: incremental detokenization sends exactly the text a whole decode gives, split anywhere."""

import pytest

from runtime.openai_api import TextStream
from tests.conftest import make_tiny_tokenizer

TEXT = ("The storm hit Sydney on Tuesday — 40 mm of rain, café owners said « trop », and 🌧️ emoji; "
        "the fire service said the blaze was under control.\nNext line: naïve coöperation.")


def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace: a leading "▁" per word, dropped at the start of a decode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from core.data import load_corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"],
                                  initial_alphabet=[f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(load_corpus("train"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("make", [make_tiny_tokenizer, metaspace_tokenizer], ids=["byte-level", "metaspace"])
def test_streamed_deltas_join_to_the_whole_decode(make):
    tokenizer = make()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    stream = TextStream(tokenizer, [])
    deltas = [stream.push(t) for t in ids]
    assert "".join(deltas) + stream.flush() == whole
    assert all("\ufffd" not in d for d in deltas)  # a multi-byte character is sent whole or not yet
    assert sum(1 for d in deltas if d) > len(ids) // 3  # and text flows as it comes, not all at the end


@pytest.mark.parametrize("make", [make_tiny_tokenizer, metaspace_tokenizer], ids=["byte-level", "metaspace"])
def test_several_tokens_per_push_and_the_backend_decode_give_the_same_text(make):
    """The server pushes a burst's tokens at once (no stop strings) and decodes with the Rust backend where the
    wrapper would add nothing: the same text as one token at a time through `tokenizer.decode`."""
    tokenizer = make()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    stream = TextStream(tokenizer, [])
    assert stream.backend is not None  # both are fast tokenizers without space clean-up
    bursts, at = [], 0
    for n in [1, 5, 3, 8, 2] * len(ids):  # bursts of varying sizes, covering every token once
        bursts.append(ids[at:at + n])
        at += n
        if at >= len(ids):
            break
    deltas = [stream.push(*burst) for burst in bursts]
    assert "".join(deltas) + stream.flush() == whole
    assert all("\ufffd" not in d for d in deltas) and sum(1 for d in deltas if d) > len(bursts) // 3
    wrapped = TextStream(tokenizer, [])
    wrapped.backend = None  # through tokenizer.decode
    assert "".join(wrapped.push(t) for t in ids) + wrapped.flush() == whole


@pytest.mark.parametrize("make", [make_tiny_tokenizer, metaspace_tokenizer], ids=["byte-level", "metaspace"])
def test_stop_strings_cut_where_the_whole_decode_would(make):
    tokenizer = make()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    for stops in (["fire service"], ["said", "rain"], ["Next line"]):
        stream = TextStream(tokenizer, stops)
        sent = ""
        for t in ids:
            sent += stream.push(t)
            if stream.stopped:
                break
        sent += stream.flush()
        assert stream.stopped
        assert sent == whole[:min(whole.find(s) for s in stops)]
        assert stream.push(ids[0]) == "" and stream.flush() == ""  # nothing after the stop
