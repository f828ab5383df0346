"""A SentencePiece ("llama") tokenizer in a GGUF, and transformers' ids for it.

Trains a small BPE SentencePiece model (byte fallback on, like Llama 2 and Mistral) on text
written here, stores its pieces, scores and token types in a GGUF the way llama.cpp's converter
does (`tokenizer.ggml.model = "llama"`, no merges), and records what transformers' tokenizer
built from that GGUF gives for a list of strings (ids with BOS, and the decoded text).

    python tests/reference/make_spm_gguf_fixture.py      (needs sentencepiece, gguf)
"""
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import gguf
import sentencepiece as spm
from transformers import AutoTokenizer

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "gguf"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tokenizer cuts text into pieces; the model reads the pieces.",
    "Fine-tuning a small model in the browser keeps the data on the machine.",
    "Numbers like 12345 and 2024 are split, and so are names like Llama and Mistral.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Sentence piece models mark the start of a word with a special underscore.",
] * 20
STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces and trailing ",
    "unseen: zebra ÿ café 日本 🙂",
    "line one\nline two\ttab",
    "Numbers 12345 and 2024",
]


def main():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, add_dummy_prefix=True, remove_extra_whitespaces=False,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 6 byte.
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)

    path = OUT / "spm_llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    cases = []
    for s in STRINGS:
        ids = tok(s)["input_ids"]
        cases.append({"text": s, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True)})
    (OUT / "spm_llama.json").write_text(json.dumps({"vocab_size": len(tokens), "cases": cases}, indent=1, ensure_ascii=False) + "\n")
    print(f"{path}: {len(tokens)} tokens; {len(cases)} cases")


if __name__ == "__main__":
    main()
