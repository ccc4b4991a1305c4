#!/usr/bin/env python3
"""Writes pretokenize_cases.json: random texts split by the pre-tokenizer regexes of GPT-2, Llama 3
and Qwen2, as the third-party `regex` module (a backtracking engine with \\p{..} support, independent of
our hand-written matchers) splits them. Usage: python3 gen_pretokenize_cases.py > pretokenize_cases.json
"""
import json
import random

import regex

PATTERNS = {
    "gpt-2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "llama-bpe": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}
# Letters, digits (ASCII and others), spaces of several kinds, punctuation, symbols, combining marks
# and the letters of the contractions, so that every alternative of the regexes is exercised.
ALPHABET = list("aZsStTrReEvVmMlLdD0159'' '\t\n\r.,!?$-_") + [
    "\u00a0", "\u3000", "\u2003", "\u00e9", "\u00dc", "\u4f60", "\u0661", "\u00bd", "\u2167",
    "\u0301", "\U0001F600", "\u0915", "\u093f", "\u200d", "\u2581",
]


def main():
    rng = random.Random(1234)
    cases = []
    for _ in range(400):
        n = rng.randint(1, 24)
        text = "".join(rng.choice(ALPHABET) for _ in range(n))
        cases.append({"text": text, **{k: regex.findall(p, text) for k, p in PATTERNS.items()}})
    print(json.dumps({"generator": "tests/tokenizer/gen_pretokenize_cases.py",
                      "regex_module": regex.__version__, "cases": cases}, ensure_ascii=False, indent=0))


if __name__ == "__main__":
    main()
