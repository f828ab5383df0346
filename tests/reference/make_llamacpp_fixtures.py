"""llama.cpp fixtures for `hone export --gguf` (tests/fixtures/llamacpp/): llama.cpp itself runs
hone's LoRA GGUFs.

For each of the tiny llama, mistral, qwen2 and phi3 bases in tests/fixtures:
 1. a PEFT adapter (r 4, alpha 8, all-linear; qwen2's with rsLoRA), A and B drawn from a seeded
    generator so that B is not zero → `<arch>_adapter/`;
 2. llama.cpp's own `convert_lora_to_gguf.py` (f32) of that adapter → `<arch>_converter.gguf`;
 3. the base as an f32 GGUF by llama.cpp's `convert_hf_to_gguf.py` (not committed: hone's test
    runs the Hugging Face base);
 4. `hone export --gguf` of the adapter, loaded by llama.cpp (llama-cpp-python) on top of that
    base GGUF: its logits for fixed ids → `<arch>_logits.safetensors` ("ids", "llama_cpp"), with
    PEFT's logits ("peft", transformers + PEFT) beside them.
The script checks that llama.cpp's logits with hone's GGUF equal PEFT's (1e-4 relative) and,
where the converter's alpha is right (no rsLoRA), llama.cpp's logits with the converter's GGUF.

Then, on the default model (SmolLM2-135M-Instruct's Q4_1 GGUF, `cargo xtask default-model`,
given as SMOLLM2_GGUF): a seeded adapter (r 2 on q_proj and v_proj, bf16) → `smollm2_adapter/`,
merged by `hone merge --gguf` as f16, q8_0 and q4_0; llama.cpp's greedy tokens for the chat
prompt of tests/fixtures/smollm2_gguf.json with each merged file, with the base alone, and with
the base plus hone's LoRA GGUF → `smollm2_merge.json`. Finally ggml's reference Q8_0/Q4_0
quantization of seeded values by the `gguf` package → `quants.safetensors`.

With the argument `hf-gguf` it makes only the fixtures of `hone merge --model DIR --gguf` (a
Hugging Face base; crates/hone/tests/gguf_hf.rs): see `hf_gguf` below.

Needs, besides tests/reference/requirements.txt: llama-cpp-python 0.3.36 built from its source
distribution and sentencepiece (the converter imports it), and that source unpacked:

    pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d /tmp/llcpp
    tar xzf /tmp/llcpp/llama_cpp_python-0.3.36.tar.gz -C /tmp/llcpp
    pip install --no-binary llama-cpp-python -r tests/reference/requirements-llamacpp.txt
    cargo build -p hone-cli
    LLAMA_CPP_DIR=/tmp/llcpp/llama_cpp_python-0.3.36/vendor/llama.cpp HONE=target/debug/hone \\
        SMOLLM2_GGUF="$(cargo xtask default-model)" python tests/reference/make_llamacpp_fixtures.py
"""
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "llamacpp"
LLAMA_CPP = Path(os.environ["LLAMA_CPP_DIR"])
HONE = os.environ.get("HONE", str(ROOT / "target" / "debug" / "hone"))
ARCHS = {"llama": False, "mistral": False, "qwen2": True, "phi3": False}  # arch → use_rslora
# Mistral's fixture has a sliding window of 4, which llama.cpp's llama graph does not apply: 4 ids
# there. Phi-3's switches to its long rope factors past 8 positions: transformers decides by the
# sequence's length, llama.cpp by the context's (256 at least), so 12 ids put both on the long ones.
IDS_OF = {"mistral": [5, 17, 42, 99], "phi3": [5, 17, 42, 99, 3, 250, 7, 64, 11, 300, 23, 1]}
IDS = [5, 17, 42, 99, 3, 250, 7, 64]


def make_adapter(arch, rslora):
    torch.manual_seed(11)
    base = AutoModelForCausalLM.from_pretrained(FIX / arch, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, use_rslora=rslora, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    out = OUT / f"{arch}_adapter"
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    # The path PEFT records is this machine's, and it writes target_modules from a set, in an
    # order that changes from run to run: keep the committed file free of both.
    cfg_file = out / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text().replace(str(FIX), "tests/fixtures"))
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "README.md").unlink(missing_ok=True)
    return out


def peft_logits(arch, adapter, ids):
    base = AutoModelForCausalLM.from_pretrained(FIX / arch, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def run_converter(script, argv):
    """One of llama.cpp's converters, in this process (so that the patches below apply)."""
    old = sys.argv
    sys.argv = [str(script)] + [str(a) for a in argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = old


def patch_base_vocab():
    # The fixtures' tiny BPE tokenizer is not one of the pre-tokenizers llama.cpp knows by hash,
    # and Phi-3's converter wants a sentencepiece file: a plain GPT-2 style vocabulary is enough
    # for logits of given ids (no text is tokenized).
    sys.path.insert(0, str(LLAMA_CPP))
    sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))
    import conversion.base as base
    import conversion.phi as phi

    global ORIGINAL_PHI3_SET_VOCAB
    ORIGINAL_PHI3_SET_VOCAB = phi.Phi3MiniModel.set_vocab
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    phi.Phi3MiniModel.set_vocab = lambda self: self._set_vocab_gpt2()


def llama_cpp_logits(base_gguf, lora_gguf, ids):
    from llama_cpp import Llama

    kw = {"lora_path": str(lora_gguf)} if lora_gguf else {}
    llm = Llama(model_path=str(base_gguf), **kw, n_ctx=len(ids), n_batch=len(ids), n_threads=1, logits_all=True, verbose=False, seed=0,
                # An f16 KV cache (llama.cpp's default) alone moves the logits by ~1e-3.
                type_k=0, type_v=0, flash_attn=False)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    patch_base_vocab()
    tmp = Path(tempfile.mkdtemp())
    for arch, rslora in ARCHS.items():
        adapter = make_adapter(arch, rslora)
        converter = OUT / f"{arch}_converter.gguf"
        run_converter(LLAMA_CPP / "convert_lora_to_gguf.py", ["--base", FIX / arch, "--outtype", "f32", "--outfile", converter, adapter])
        base_gguf = tmp / f"{arch}_base.gguf"
        # llama.cpp sets attributes of Phi-3's special tokens, which the tiny vocabulary lacks, when
        # the model's name says phi3: a neutral name.
        run_converter(LLAMA_CPP / "convert_hf_to_gguf.py", [FIX / arch, "--outtype", "f32", "--model-name", "tiny", "--outfile", base_gguf])
        hone_gguf = tmp / f"{arch}_hone.gguf"
        subprocess.run([HONE, "export", "--adapter", adapter, "--model", FIX / arch, "--gguf", hone_gguf], check=True)
        ids = IDS_OF.get(arch, IDS)
        ours = llama_cpp_logits(base_gguf, hone_gguf, ids)
        theirs = llama_cpp_logits(base_gguf, converter, ids)
        peft = peft_logits(arch, adapter, ids)
        base_only = peft_logits_base(arch, ids)
        print(f"{arch}: llama.cpp(hone GGUF) vs PEFT {rel(ours, peft):.2e}; llama.cpp(converter GGUF) vs PEFT {rel(theirs, peft):.2e}; the adapter moves the logits by {rel(peft, base_only):.2e}")
        assert rel(ours, peft) < 1e-4, arch
        if not rslora:
            assert rel(theirs, peft) < 1e-4, arch
        save_file(
            {"ids": torch.tensor(ids, dtype=torch.int64), "llama_cpp": torch.from_numpy(ours).contiguous(), "peft": torch.from_numpy(peft).contiguous()},
            OUT / f"{arch}_logits.safetensors",
        )
    smollm2_merge(tmp)
    quants()
    shutil.rmtree(tmp)


GREEDY_TOKENS = 24


def greedy(model_path, prompt, lora_path=None, eos=None):
    """llama.cpp's greedy continuation (argmax of each step's logits, f32 KV cache)."""
    from llama_cpp import Llama

    kw = {"lora_path": str(lora_path)} if lora_path else {}
    llm = Llama(model_path=str(model_path), n_ctx=len(prompt) + GREEDY_TOKENS, n_batch=len(prompt), n_threads=1, logits_all=True, verbose=False, seed=0, type_k=0, type_v=0, flash_attn=False, **kw)
    llm.eval(prompt)
    out = []
    for _ in range(GREEDY_TOKENS):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        if tok == eos:
            break
        llm.eval([tok])
    llm.close()
    return out


def smollm2_merge(tmp):
    from gguf import GGUFReader
    from safetensors.torch import save_file as save

    path = Path(os.environ["SMOLLM2_GGUF"])
    meta = GGUFReader(path).fields
    num = lambda k: int(meta[k].contents())
    hidden, heads, kv, layers = num("llama.embedding_length"), num("llama.attention.head_count"), num("llama.attention.head_count_kv"), num("llama.block_count")
    head_dim = hidden // heads
    eos = num("tokenizer.ggml.eos_token_id")
    out = OUT / "smollm2_adapter"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    g = torch.Generator().manual_seed(21)
    r = 2
    tensors = {}
    for i in range(layers):
        for name, rows in [("q_proj", heads * head_dim), ("v_proj", kv * head_dim)]:
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(r, hidden, generator=g) / hidden**0.5).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(rows, r, generator=g) * 0.05).to(torch.bfloat16)
    save(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none",
           "target_modules": ["q_proj", "v_proj"], "use_rslora": False, "use_dora": False, "base_model_name_or_path": "SmolLM2-135M-Instruct"}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    prompt = json.loads((FIX / "smollm2_gguf.json").read_text())["prompt_ids"]
    result = {"prompt_ids": prompt, "tokens": GREEDY_TOKENS, "base": greedy(path, prompt, eos=eos)}
    for ty in ["f16", "q8_0", "q4_0"]:
        merged = tmp / f"smollm2_{ty}.gguf"
        subprocess.run([HONE, "merge", "--model", path, "--adapter", out, "--gguf", merged, "--type", ty], check=True)
        result[ty] = greedy(merged, prompt, eos=eos)
    lora = tmp / "smollm2_lora.gguf"
    subprocess.run([HONE, "export", "--model", path, "--adapter", out, "--gguf", lora], check=True)
    result["base_with_lora_gguf"] = greedy(path, prompt, lora_path=lora, eos=eos)
    for k in ["f16", "q8_0", "q4_0", "base_with_lora_gguf"]:
        same = sum(a == b for a, b in zip(result[k], result["f16"]))
        print(f"smollm2 {k}: {same}/{len(result['f16'])} greedy tokens as f16's; base differs from f16 at {next((i for i, (a, b) in enumerate(zip(result['base'], result['f16'])) if a != b), None)}")
    assert result["base"] != result["f16"], "the adapter must change the greedy tokens"
    (OUT / "smollm2_merge.json").write_text(json.dumps(result, indent=1) + "\n")


def quants():
    from gguf import GGMLQuantizationType, quants as q
    from safetensors.numpy import save_file as save_np

    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 64)).astype(np.float32)
    x[1] = 0.0  # an all-zero row: d = 0
    x[2, :32] = np.arange(32, dtype=np.float32) - 15.5  # ties at .5 steps
    x[3] *= 1e-3
    out = {"x": x}
    for name, ty in [("q8_0", GGMLQuantizationType.Q8_0), ("q4_0", GGMLQuantizationType.Q4_0)]:
        out[name] = np.ascontiguousarray(q.quantize(x, ty)).view(np.uint8).reshape(-1)
    save_np(out, str(OUT / "quants.safetensors"))


def peft_logits_base(arch, ids):
    base = AutoModelForCausalLM.from_pretrained(FIX / arch, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return base(torch.tensor([ids])).logits[0].float().numpy()


# Hugging Face bases written as GGUF by `hone merge --gguf` (export::gguf_hf), against llama.cpp's
# convert_hf_to_gguf.py. `llama_chat` is the llama fixture with the chat fixture's tokenizer files
# (tokenizer_config.json: special tokens, chat template); `llama3` has Llama 3.1's rope scaling
# (rope_freqs) and bf16 weights.
# `llama_spm` and `phi3_spm` are the llama and phi3 fixtures with tests/fixtures/spm's
# SentencePiece tokenizer (tokenizer.model and a tokenizer_config.json with added tokens).
HF_GGUF_BASES = ["llama", "mistral", "qwen2", "phi3", "llama3", "smollm2", "llama_chat", "llama_spm", "phi3_spm"]
MERGED_OF = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "phi3": "phi3", "llama_spm": "llama", "phi3_spm": "phi3"}
SPM = FIX / "spm"


def make_spm():
    """A tiny SentencePiece BPE model (byte fallback, a control and a user-defined symbol; 320
    pieces, so ids 322-383 of the fixtures' 384 are padding) and a tokenizer_config.json that adds
    tokens over it, as Llama 2 / Mistral / Phi-3 repositories hold them."""
    import io
    import random

    import sentencepiece as spm

    SPM.mkdir(exist_ok=True)
    rnd = random.Random(3)
    words = "the a red blue green gold cat dog runs jumps over under quickly slowly tiny model learns data text token".split()
    lines = [" ".join(rnd.choice(words) for _ in range(8)) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=320, model_type="bpe", byte_fallback=True, num_threads=1,
                                   character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, normalization_rule_name="identity", minloglevel=2,
                                   user_defined_symbols=["<|user|>"], control_symbols=["<|end|>"])
    (SPM / "tokenizer.model").write_bytes(buf.getvalue())
    tok = lambda content, special: {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": special}
    cfg = {
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": True, "bos_token": "<s>", "eos_token": "<|end|>", "unk_token": "<unk>", "pad_token": "<unk>",
        "tokenizer_class": "LlamaTokenizer", "added_tokens_decoder": {"0": tok("<unk>", True), "1": tok("<s>", True), "2": tok("</s>", True), "3": tok("<|end|>", True),
                                                                    "4": tok("<|user|>", False), "320": tok("<|assistant|>", True), "321": tok("▁custom", False)},
        "chat_template": "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}",
    }
    (SPM / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def hf_base_dir(name, tmp):
    parts = {
        "llama_chat": [("llama", "config.json"), ("llama", "model.safetensors"), ("chat", "tokenizer.json"), ("chat", "tokenizer_config.json")],
        "llama_spm": [("llama", "config.json"), ("llama", "model.safetensors"), ("spm", "tokenizer.model"), ("spm", "tokenizer_config.json")],
        "phi3_spm": [("phi3", "config.json"), ("phi3", "model.safetensors"), ("spm", "tokenizer.model"), ("spm", "tokenizer_config.json")],
    }
    if name not in parts:
        return FIX / name
    d = tmp / name
    d.mkdir(exist_ok=True)
    for src, f in parts[name]:
        shutil.copyfile(FIX / src / f, d / f)
    return d


def describe(path):
    """A GGUF's metadata (type and value per key) and tensor table (name, shape as PyTorch
    orders it, type, SHA-256 of the bytes): small enough to commit, exact enough to compare."""
    import hashlib

    from gguf import GGUFReader

    r = GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        types = [t.name for t in f.types]
        meta[k] = {"type": "/".join(types), "value": f.contents()}
    tensors = [{"name": t.name, "shape": [int(d) for d in reversed(t.shape.tolist())], "type": t.tensor_type.name, "sha256": hashlib.sha256(bytes(t.data.tobytes())).hexdigest()} for t in r.tensors]
    return {"metadata": meta, "tensors": tensors}


def hf_gguf():
    """For each base in HF_GGUF_BASES: the converter's f32 GGUF described → `hf_<base>.json`. For
    the bases with an adapter (`<arch>_adapter/`): `hone merge --gguf --type f32` of base and
    adapter, llama.cpp's logits with it (they must equal PEFT's) and the SHA-256 of the file
    they were computed on → `hf_<arch>_merged.safetensors` and the JSON's `hone_merged_sha256`."""
    import hashlib

    import conversion.phi as phi

    make_spm()
    tmp = Path(tempfile.mkdtemp())
    patched = phi.Phi3MiniModel.set_vocab
    for name in HF_GGUF_BASES:
        base = hf_base_dir(name, tmp)
        conv = tmp / f"{name}.gguf"
        # The SentencePiece bases take the converter's own Phi-3 vocabulary code.
        phi.Phi3MiniModel.set_vocab = ORIGINAL_PHI3_SET_VOCAB if name.endswith("_spm") else patched
        run_converter(LLAMA_CPP / "convert_hf_to_gguf.py", [base, "--outtype", "f32", "--model-name", "tiny", "--outfile", conv])
        desc = describe(conv)
        arch = MERGED_OF.get(name)
        adapter = OUT / f"{arch}_adapter"
        if arch:
            merged = tmp / f"{name}_merged.gguf"
            subprocess.run([HONE, "merge", "--model", base, "--adapter", adapter, "--gguf", merged, "--type", "f32", "--name", "tiny"], check=True)
            ids = IDS_OF.get(arch, IDS)
            # llama.cpp runs the merged model without an adapter: a LoRA-free call.
            ours = llama_cpp_logits(merged, None, ids)
            peft = peft_logits(arch, adapter, ids)
            print(f"hf {name}: llama.cpp on hone's merged GGUF vs PEFT {rel(ours, peft):.2e}")
            assert rel(ours, peft) < 1e-4, name
            desc["hone_merged_sha256"] = hashlib.sha256(merged.read_bytes()).hexdigest()
            save_file({"ids": torch.tensor(ids, dtype=torch.int64), "llama_cpp": torch.from_numpy(ours).contiguous()}, OUT / f"hf_{name}_merged.safetensors")
        (OUT / f"hf_{name}.json").write_text(json.dumps(desc, indent=0, sort_keys=True, ensure_ascii=False) + "\n")
        print(f"hf {name}: {len(desc['metadata'])} keys, {len(desc['tensors'])} tensors")
        # The converter's f16 and q8_0 files (which tensors stay f32, the fallback to f16, the
        # quantizers): their tensor tables.
        if name in ("llama", "qwen2"):
            for ty in ["f16", "q8_0"]:
                conv = tmp / f"{name}_{ty}.gguf"
                run_converter(LLAMA_CPP / "convert_hf_to_gguf.py", [base, "--outtype", ty, "--model-name", "tiny", "--outfile", conv])
                d = describe(conv)
                (OUT / f"hf_{name}_{ty}.json").write_text(json.dumps({"file_type": d["metadata"]["general.file_type"], "tensors": d["tensors"]}, indent=0, sort_keys=True) + "\n")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    if sys.argv[1:] == ["hf-gguf"]:
        patch_base_vocab()
        hf_gguf()
    else:
        main()
