"""Writes the LoRA example dataset (the same task in the three mlx-lm formats):

    prompt      "Bless Margaret."
    completion  " The LORD bless thee, Margaret, and keep thee."

A blessing in the style of the default model's corpus (Numbers 6:24) around a name the
model must copy. Names are split into disjoint train / valid / test sets, so the
held-out score measures the learned pattern, not memorised names.

    python examples/lora/make_data.py            # -> examples/lora/data/{completion,chat,text}/
"""

import json
import random
from pathlib import Path

NAMES = """Aaron Abigail Adam Adrian Agnes Alan Albert Alice Amelia Amos Andrew Angela Anna Anthony
Arthur Audrey Barbara Beatrice Benjamin Bernard Bertha Betty Brian Bridget Caleb Carl Caroline
Catherine Cecil Charles Charlotte Christopher Clara Claude Colin Daniel Daphne David Deborah Dennis
Diana Dorothy Douglas Edith Edmund Edward Eleanor Elijah Elizabeth Ellen Emily Emma Eric Esther Ethan
Eugene Eva Evelyn Felix Fiona Florence Frances Francis Frank Frederick Gabriel George Gerald Gilbert
Gloria Grace Gregory Hannah Harold Harriet Harry Hazel Helen Henry Herbert Hilda Howard Hugh Ian Irene
Isaac Isabel Ivan Jack Jacob James Jane Janet Jasper Jean Jennifer Jeremy Jessica Joan Joel John
Jonathan Joseph Joyce Judith Julia Julian Justin Karen Kathleen Keith Kenneth Laura Lawrence Leah
Leonard Lillian Linda Lionel Lois Louis Lucy Luke Lydia Mabel Margaret Maria Mark Martha Martin Mary
Matthew Maurice Michael Miriam Molly Nancy Naomi Nathan Neil Nicholas Nora Norman Oliver Olivia Oscar
Owen Patricia Patrick Paul Pauline Peter Philip Phoebe Rachel Ralph Raymond Rebecca Richard Robert
Roger Ronald Rose Ruth Samuel Sarah Simon Sophia Stanley Stella Stephen Susan Sylvia Teresa Thomas
Timothy Ursula Valerie Victor Vincent Violet Walter Wendy Wilfred William Winifred Yvonne Zachary""".split()


def records(names):
    for n in names:
        prompt, completion = f"Bless {n}.", f" The LORD bless thee, {n}, and keep thee."
        yield {
            "completion": {"prompt": prompt, "completion": completion},
            "chat": {"messages": [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": completion}]},
            "text": {"text": prompt + completion},
        }


def main(out=Path(__file__).parent / "data"):
    names = sorted(set(NAMES))
    random.Random(0).shuffle(names)
    splits = {"test": names[:30], "valid": names[30:50], "train": names[50:]}
    for fmt in ("completion", "chat", "text"):
        (out / fmt).mkdir(parents=True, exist_ok=True)
        for split, ns in splits.items():
            lines = [json.dumps(r[fmt]) for r in records(ns)]
            (out / fmt / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    print({k: len(v) for k, v in splits.items()}, "names ->", out)


if __name__ == "__main__":
    main()
