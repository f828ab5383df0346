"""Datasets as CSV and Parquet (tests/fixtures/tables/), from the rows of tests/fixtures/chat/cases.json
(TRL's expected ids for each format): `<format>.csv` and `<format>.parquet` hold the first case's
rows of each format (text, completion, chat, alpaca). Parquet as Hugging Face datasets writes it
(`Dataset.to_parquet`: pyarrow, Snappy pages, chat messages as a list of structs); CSV with a
header row, a messages list as a JSON cell. `renamed.csv` holds the completion rows under other
column names (question, answer), for `--columns prompt=question,completion=answer`.

    python tests/reference/make_table_fixtures.py
"""
import csv
import json
from pathlib import Path

from datasets import Dataset

FIX = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
OUT = FIX / "tables"


def write_csv(path, rows, rename=None):
    rename = rename or {}
    cols = list(rows[0].keys())
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([rename.get(c, c) for c in cols])
        for r in rows:
            w.writerow([json.dumps(r[c], ensure_ascii=False) if isinstance(r[c], list) else r[c] for c in cols])


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    cases = json.loads((FIX / "chat" / "cases.json").read_text())
    seen = set()
    for case in cases:
        fmt = case["format"]
        if fmt in seen:
            continue
        seen.add(fmt)
        rows = case["rows"]
        write_csv(OUT / f"{fmt}.csv", rows)
        Dataset.from_list(rows).to_parquet(str(OUT / f"{fmt}.parquet"))
        if fmt == "completion":
            write_csv(OUT / "renamed.csv", rows, {"prompt": "question", "completion": "answer"})
        print(fmt, len(rows), "rows")


if __name__ == "__main__":
    main()
