"""What TRL's SFTTrainer (with transformers' chat templates) trains on, for hone's dataset code
to match: token ids and labels (-100 where no loss) for each dataset format, with
completion-only and assistant-only loss. The chat template marks assistant turns with
`{% generation %}`, which transformers turns into TRL's `assistant_masks`.

    python tests/reference/make_data_fixtures.py
"""
import json
import shutil
import tempfile
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

FIX = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
OUT = FIX / "chat"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}"
    "{% generation %}{{ message['content'] + '<|end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

ALPACA_PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")

DATA = {
    "text": [{"text": "hone fine-tunes models in the browser."}, {"text": "Paris is the capital of France."}],
    "completion": [{"prompt": "The capital of France is", "completion": " Paris."},
                   {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"}],
    "chat": [{"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "What is LoRA?"},
                           {"role": "assistant", "content": "Low-rank adaptation."},
                           {"role": "user", "content": "And QLoRA?"},
                           {"role": "assistant", "content": "LoRA on a 4-bit base."}]}],
    "alpaca": [{"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
               {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}],
}


def alpaca_to_completion(ex):
    has_input = bool(ex["input"])
    prompt = ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if has_input else "",
        instruction=ex["instruction"], input_block=f"### Input:\n{ex['input']}\n\n" if has_input else "")
    return {"prompt": prompt, "completion": ex["output"]}


def processed(rows, tokenizer, model_dir, **cfg):
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, report_to=[], max_length=None, packing=False, use_cpu=True, bf16=False, **cfg)
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        out = []
        for row in trainer.train_dataset:
            # TRL folds the mask that applies into `labels` (-100 where no loss).
            ids = row["input_ids"]
            labels = row["labels"] if "labels" in row else list(ids)
            out.append({"input_ids": ids, "labels": labels})
        return out


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIX / "tokenizer.json", OUT / "tokenizer.json")
    (OUT / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|end|>",
        "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    tok = PreTrainedTokenizerFast.from_pretrained(OUT)
    model_dir = FIX / "llama"
    cases = []
    for fmt, rows in DATA.items():
        src = [alpaca_to_completion(r) for r in rows] if fmt == "alpaca" else rows
        if fmt == "chat":
            variants = {"assistant_only": dict(assistant_only_loss=True), "all": dict(assistant_only_loss=False)}
        elif fmt in ("completion", "alpaca"):
            variants = {"completion_only": dict(completion_only_loss=True), "all": dict(completion_only_loss=False)}
        else:
            variants = {"all": {}}
        for name, cfg in variants.items():
            cases.append({"format": fmt, "loss": name, "rows": rows, "expected": processed(src, tok, model_dir, **cfg)})
    (OUT / "cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    rendered = tok.apply_chat_template(DATA["chat"][0]["messages"], tokenize=False)
    (OUT / "rendered.txt").write_text(rendered)
    print(len(cases), "cases;", rendered)


if __name__ == "__main__":
    main()
