"""Writes the LoRA example dataset (the same task in the three mlx-lm formats):

    prompt      "Bless Margaret."
    completion  " The LORD bless thee, Margaret, and keep thee."

A blessing in the style of the default model's corpus (Numbers 6:24) around a name the
model must copy. The names are the 178 proper names of the KJV that are a single token
of the default model's tokenizer; they are split into disjoint train / valid / test
sets, so the held-out score measures the learned pattern, not memorised names.

    python examples/lora/make_data.py            # -> examples/lora/data/{completion,chat,text}/
"""

import json
import random
from pathlib import Path

NAMES = """Aaron Abiathar Abner Abraham Abram Absalom Adam Ahab Ahasuerus Ahaz Ahaziah Almighty Amalek
Amaziah Ammon Amorites Asa Asaph Asher Assyria Azariah Baal Babylon Balaam Bashan Beersheba Bel
Ben Benaiah Benjamin Bethel Bethlehem Caesar Caleb Canaan Canaanites Carmel Chaldeans Christ
Damascus Dan Daniel David Edom Egypt Egyptians Eleazar Eli Elias Elijah Elisha Ephraim Esau
Esther Gad Galilee Gath Gedaliah Gentiles Gibeah Gibeon Gideon Gilead Gilgal Ham Haman Hamath
Hebrew Hebron Herod Heshbon Hezekiah Hilkiah Hor Isaac Isaiah Ishmael Israel Issachar Jacob
James Jebus Jehoiada Jehoiakim Jehoshaphat Jehu Jeremiah Jericho Jeroboam Jerusalem Jesse Jesus
Jew Jews Jezreel Joab Joash Job John Jonathan Joram Jordan Joseph Joshua Josiah Juda Judaea
Judah Judas Kir Kohath Laban Leah Lebanon Levi Levites Manasseh Mary Merari Micah Micha Midian
Moab Mordecai Moses Naphtali Nathan Nebuchadnezzar Nebuchadrezzar Ner Noah Nun Obed Paul Peter
Pharaoh Pharisees Philip Philistine Philistines Pilate Rachel Ramah Rebekah Rehob Rehoboam
Reuben Samaria Samson Samuel Sarah Satan Saul Seir Selah Shaphan Sheba Shechem Shem Shemaiah
Shiloh Shimei Sihon Simeon Simon Sinai Sodom Solomon Syria Syrians Tyre Zadok Zebul Zebulun
Zechariah Zedekiah Zidon Zion""".split()


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
