"""NF4 quantization as bitsandbytes does it on the CPU, for hone to match bit for bit:
packed codes, absmax, double-quantized absmax (codes, nested absmax, offset) and the
dequantized weights, on shapes that are and are not multiples of the block size.

    python tests/reference/make_nf4_fixtures.py
"""
import json
import shutil
from pathlib import Path

import bitsandbytes.functional as F
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

FIX = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
OUT = FIX / "nf4"

# (name, shape, blocksize, scale); the last includes exact zeros and an all-zero block.
CASES = [
    ("square", (64, 64), 64, 0.05),
    ("ragged", (33, 37), 64, 1.0),
    ("wide", (24, 300), 128, 0.02),
    ("small_block", (16, 40), 32, 3.0),
    ("many_blocks", (96, 384), 64, 0.1),  # 576 blocks: more than one nested block of 256
    ("zeros", (8, 72), 64, 0.5),
]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    t = {}
    for name, shape, bs, scale in CASES:
        w = torch.randn(shape, generator=g) * scale
        if name == "zeros":
            w[0, :] = 0.0  # a whole block of zeros
            w[3, 5] = 0.0
        t[f"{name}.weight"] = w
        t[f"{name}.blocksize"] = torch.tensor([bs], dtype=torch.int64)
        packed, st = F.quantize_4bit(w, blocksize=bs, compress_statistics=False, quant_type="nf4")
        t[f"{name}.packed"] = packed.reshape(-1).contiguous()
        t[f"{name}.absmax"] = st.absmax.float().contiguous()
        t[f"{name}.dequantized"] = F.dequantize_4bit(packed, st).float().contiguous()
        packed2, st2 = F.quantize_4bit(w, blocksize=bs, compress_statistics=True, quant_type="nf4")
        assert torch.equal(packed, packed2)
        t[f"{name}.dq.absmax"] = st2.absmax.contiguous()  # u8 codes of (absmax - offset)
        t[f"{name}.dq.nested_absmax"] = st2.state2.absmax.float().contiguous()
        t[f"{name}.dq.offset"] = st2.offset.reshape(1).float().contiguous()
        t[f"{name}.dq.dequantized"] = F.dequantize_4bit(packed2, st2).float().contiguous()
        t["nf4_code"] = st.code.float().contiguous()
        t["nested_code"] = st2.state2.code.float().contiguous()
    save_file(t, str(OUT / "nf4.safetensors"))
    print({k: tuple(v.shape) for k, v in t.items() if k.startswith("ragged")})


def bnb4_checkpoint():
    """transformers' own 4-bit save of the llama fixture (NF4, double quant), and its logits
    computed on bitsandbytes' exact path (dequantize, then f32 matmul)."""
    out = FIX / "llama_bnb4"
    if out.exists():
        shutil.rmtree(out)
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(FIX / "llama", dtype=torch.float32, quantization_config=cfg,
                                                 attn_implementation="eager", device_map="cpu")
    model.save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)
    shutil.copy(FIX / "llama" / "tokenizer.json", out / "tokenizer.json")
    ids = load_file(str(FIX / "llama" / "expected.safetensors"))["ids_1"].unsqueeze(0)
    # Inputs that require grad keep bitsandbytes off its approximate CPU inference kernel.
    model.enable_input_require_grads()
    logits = model(ids).logits[0].detach().float().contiguous()
    save_file({"ids": ids[0], "logits": logits}, str(out / "expected.safetensors"))


if __name__ == "__main__":
    main()
    bnb4_checkpoint()
