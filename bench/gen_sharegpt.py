"""Synthetic Chinese ShareGPT data at the seeds' scale: N conversations of 1–3 turns, JSON Lines.

Sentences come from the HSK sentence lists (``hsk-sentences-audio``) and are combined at random, so
no two conversations are the same and the lengths spread like real chat data (~1.4 kB, ~400 Llama 3
tokens per conversation). ``--duplicates`` repeats that share of the lines (dedup has work to do);
``--bad-every`` writes a malformed line every K lines (``on_error: skip`` counts them).

    python bench/gen_sharegpt.py 300000 /tmp/zh300k.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgezh.data.corpora import hsk_sentences  # noqa: E402

ASK = ("请解释一下：", "你能帮我翻译这句话吗？", "这句话是什么意思？", "用这个句子造一个新句子：", "请用简单的中文说明：")
ANSWER = ("好的。", "当然可以。", "这句话的意思是：", "我们可以这样理解：", "下面是我的回答：")


def conversation(rng: random.Random, pool: list[str]) -> dict:
    turns = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        question = rng.choice(ASK) + "".join(rng.choices(pool, k=rng.randint(1, 4)))
        answer = rng.choice(ANSWER) + "".join(rng.choices(pool, k=rng.randint(10, 34)))
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"conversations": turns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("count", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--duplicates", type=float, default=0.01, help="share of lines that repeat an earlier line")
    parser.add_argument("--bad-every", type=int, default=0, help="a malformed JSON line every K lines (0: none)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    pool = [s["chinese"].strip() for s in hsk_sentences() if s.get("chinese")]
    recent: list[str] = []
    with open(args.out, "w", encoding="utf-8") as handle:
        for i in range(1, args.count + 1):
            if args.bad_every and i % args.bad_every == 0:
                handle.write('{"conversations": [{"from": "human", "value": "断了\n')
                continue
            if recent and rng.random() < args.duplicates:
                line = rng.choice(recent)
            else:
                line = json.dumps(conversation(rng, pool), ensure_ascii=False)
                recent = (recent + [line])[-1000:]
            handle.write(line + "\n")
    print(f"{args.out}: {args.count} lines, {args.out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
