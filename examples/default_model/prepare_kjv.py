"""Turn the output of Debian's `bible -f gen1:1-rev22:21` (one verse per line, "Ge1:1 text")
into one document per chapter (verses joined by spaces), documents separated by blank lines."""
import re
import sys

src, dst = sys.argv[1], sys.argv[2]
chapters, current, verses = [], None, []
for line in open(src, encoding="utf-8"):
    m = re.match(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$", line.rstrip("\n"))
    if not m:
        continue
    book, chapter, _, text = m.groups()
    if (book, chapter) != current and verses:
        chapters.append(" ".join(verses))
        verses = []
    current = (book, chapter)
    verses.append(text.strip())
if verses:
    chapters.append(" ".join(verses))
if len(chapters) < 1000:
    sys.exit(f"expected the whole KJV (1189 chapters), found {len(chapters)}")
open(dst, "w", encoding="utf-8").write("\n\n".join(chapters) + "\n")
print(f"{len(chapters)} chapters -> {dst}")
