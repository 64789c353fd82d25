"""Deterministic generator of the bundled demo instruction dataset.

Writes `demo/data/train.jsonl` and `demo/data/val.jsonl` in the format of the tutorial's S3 data: one JSON
object per line with string `input` (the prompt) and `output` (the answer). Every task has one exactly checkable
answer, and every answer is given in the same terse style: the bare result, no sentence around it, no final
period. An instruction-tuned base model answers these prompts in full sentences, so exact-match accuracy measures
whether fine-tuning taught both the style and the task.

    python demo/make_demo_data.py            # rewrite the files
    python demo/make_demo_data.py --check    # exit 1 if the committed files differ from what this generates
"""

import argparse
import json
import random
import sys
from pathlib import Path

WORDS = (
    "apple river stone cloud garden window pepper silver forest candle rocket tiger orange planet bridge "
    "castle dragon engine falcon guitar harbor island jacket kettle ladder magnet needle ocean pencil "
    "rabbit saddle tunnel violin wagon yellow zebra basket button carpet dinner eagle farmer hammer "
    "lemon mirror napkin pillow puzzle summer winter spring autumn marble meadow"
).split()
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def task_add(rng):
    a, b = rng.randint(1, 50), rng.randint(1, 9)
    return f"What is {a} + {b}?", str(a + b)


def task_subtract(rng):
    a = rng.randint(10, 60)
    b = rng.randint(1, 9)
    return f"What is {a} - {b}?", str(a - b)


def task_uppercase(rng):
    w = " ".join(rng.sample(WORDS, rng.randint(1, 2)))
    return f"Write '{w}' in capital letters.", w.upper()


def task_reverse_words(rng):
    ws = rng.sample(WORDS, 3)
    return f"Reverse the order of these words: {' '.join(ws)}", " ".join(reversed(ws))


def task_last_word(rng):
    ws = rng.sample(WORDS, 4)
    return f"What is the last word in this list: {', '.join(ws)}?", ws[-1]


def task_convert(rng):
    n = rng.randint(2, 99)
    unit, target, factor, short = rng.choice(
        [
            ("kilometers", "meters", 1000, "m"),
            ("kilograms", "grams", 1000, "g"),
            ("hours", "minutes", 60, "min"),
            ("meters", "centimeters", 100, "cm"),
            ("minutes", "seconds", 60, "s"),
        ]
    )
    return f"Convert {n} {unit} to {target}.", f"{n * factor} {short}"


def task_date(rng):
    y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    if rng.random() < 0.5:
        return f"Rewrite the date {y}-{m:02d}-{d:02d} as DD/MM/YYYY.", f"{d:02d}/{m:02d}/{y}"
    return f"Write the date {y}-{m:02d}-{d:02d} in words.", f"{MONTHS[m - 1]} {d}, {y}"


def task_max(rng):
    xs = rng.sample(range(1, 100), 4)
    return f"Which number is the largest: {', '.join(map(str, xs))}?", str(max(xs))


def task_sort(rng):
    xs = rng.sample(range(1, 100), 4)
    return f"Sort these numbers from smallest to largest: {', '.join(map(str, xs))}", ", ".join(map(str, sorted(xs)))


def task_count_words(rng):
    ws = rng.sample(WORDS, rng.randint(2, 6))
    return f"How many words are in this sentence: {' '.join(ws)}", str(len(ws))


TASKS = [
    task_add,
    task_subtract,
    task_uppercase,
    task_reverse_words,
    task_last_word,
    task_convert,
    task_date,
    task_max,
    task_sort,
    task_count_words,
]


def generate(n, seed, seen):
    """n unique records, task families in rotation so any prefix of the file covers every family."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        prompt, answer = TASKS[len(out) % len(TASKS)](rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        # The raw prompt format concatenates input and output, so the input carries its own separator.
        out.append({"input": prompt + "\n", "output": answer})
    return out


def render(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "data"))
    ap.add_argument("--check", action="store_true", help="verify the files instead of writing them")
    args = ap.parse_args()
    seen = set()
    val = generate(200, seed=2, seen=seen)  # validation first: train never repeats a val prompt
    train = generate(1200, seed=1, seen=seen)
    out = Path(args.out_dir)
    files = {out / "train.jsonl": render(train), out / "val.jsonl": render(val)}
    if args.check:
        bad = [str(p) for p, text in files.items() if not p.exists() or p.read_text() != text]
        if bad:
            sys.exit(f"demo data out of date (re-run demo/make_demo_data.py): {', '.join(bad)}")
        print("demo data matches the generator")
        return
    out.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
        print(f"wrote {path} ({text.count(chr(10))} records)")


if __name__ == "__main__":
    main()
