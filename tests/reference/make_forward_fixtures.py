"""Tiny seeded models of every architecture hone supports, a tiny BPE tokenizer, and the
logits transformers computes for fixed inputs. The output lands in tests/fixtures/ and is
committed; CI compares hone against it without Python.

    python tests/reference/make_forward_fixtures.py
"""
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, Phi3Config,
                          Qwen2Config)

ROOT = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
VOCAB = 384

CORPUS = [
    "hone fine-tunes causal language models with QLoRA inside a browser tab.",
    "The quick brown fox jumps over the lazy dog, twice, and then rests.",
    "Paris is the capital of France; Rome is the capital of Italy.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 3.14159 and 2718 appear in text; so do emojis and accents: café, naïve.",
    "<|user|>What is LoRA?<|end|><|assistant|>Low-rank adaptation of weights.<|end|>",
] * 20

TOKENIZER_STRINGS = [
    "hone fine-tunes models in the browser.",
    "Paris is the capital of France.",
    "  leading spaces, tabs\tand\nnewlines",
    "café naïve 3.14159",
    "unseen words: zyxwvut qqq",
    "<|user|>hi<|end|>",
]

# Two inputs per model: a short one and one longer than Phi-3's `original_max_position_embeddings`
# (8 here), so both LongRoPE branches and Mistral's sliding window (4 here) are exercised.
INPUT_TEXTS = ["Paris is the capital", "The quick brown fox jumps over the lazy dog, twice."]


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    # A BOS-style post-processor, so "add special tokens" matters and is checked.
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B",
        special_tokens=[("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    return tok


COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=None)

ARCHS = {
    # name: (config, storage dtype, max shard size or None, config.json in transformers 4.x style)
    "llama": (lambda: LlamaConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=False,
                                  attention_bias=False), torch.float32, None, False),
    "llama3": (lambda: LlamaConfig(**COMMON, tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)), torch.bfloat16, None, True),
    "smollm2": (lambda: LlamaConfig(**{**COMMON, "num_key_value_heads": 1}, rope_theta=100000.0,
                                    tie_word_embeddings=True), torch.float32, None, False),
    "mistral": (lambda: MistralConfig(**COMMON, rope_theta=1000000.0, sliding_window=4,
                                      tie_word_embeddings=False), torch.bfloat16, None, False),
    "qwen2": (lambda: Qwen2Config(**COMMON, rope_theta=1000000.0, tie_word_embeddings=False,
                                  use_sliding_window=False), torch.float16, "150KB", False),
    "phi3": (lambda: Phi3Config(**{**COMMON, "num_key_value_heads": 4, "max_position_embeddings": 32},
                                original_max_position_embeddings=8, tie_word_embeddings=False,
                                rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                     short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                                                     long_factor=[1.0, 1.5, 2.2, 3.0, 4.4, 6.0, 8.0, 11.0])),
             torch.float32, None, True),
}


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def to_v4_config(path):
    """Rewrites config.json the way transformers 4.x saved it (rope_theta / rope_scaling /
    torch_dtype), so hone is tested on both styles."""
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope.pop("partial_rotary_factor", None)
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = cfg.pop("dtype")
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main():
    ROOT.mkdir(parents=True, exist_ok=True)
    for arch in ARCHS:  # only this script's outputs: other scripts own the rest of fixtures/
        if (ROOT / arch).exists():
            shutil.rmtree(ROOT / arch)
    tok = make_tokenizer()
    tok.save(str(ROOT / "tokenizer.json"))
    cases = [{"text": s, "ids": tok.encode(s).ids} for s in TOKENIZER_STRINGS]
    (ROOT / "tokenizer_cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    inputs = [tok.encode(t).ids for t in INPUT_TEXTS]

    for i, (arch, (make_config, dtype, shard, v4)) in enumerate(ARCHS.items()):
        torch.manual_seed(1000 + i)
        config = make_config()
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        randomize(model, 1000 + i)
        out = ROOT / arch
        model.to(dtype).save_pretrained(out, max_shard_size=shard or "100MB")
        shutil.copy(ROOT / "tokenizer.json", out / "tokenizer.json")
        # The expected logits come from the stored (possibly bf16/f16-rounded) weights,
        # computed in f32, exactly what hone must do.
        ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
        tensors = {}
        with torch.no_grad():
            for k, ids in enumerate(inputs):
                logits = ref(torch.tensor([ids])).logits[0]
                tensors[f"ids_{k}"] = torch.tensor(ids, dtype=torch.int64)
                tensors[f"logits_{k}"] = logits.float().contiguous()
        save_file(tensors, str(out / "expected.safetensors"))
        if v4:
            to_v4_config(out / "config.json")
        gen = out / "generation_config.json"
        if gen.exists():
            gen.unlink()
        print(arch, [t.shape for t in tensors.values()])


if __name__ == "__main__":
    main()
