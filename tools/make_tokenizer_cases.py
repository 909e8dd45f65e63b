"""Write tests/fixtures/tokenizer/cases.json: reference CLIP token ids for tricky prompts.

The reference is transformers' `CLIPTokenizer`, loaded the way diffusers loads a model's
`tokenizer/` folder (vocab.json + merges.txt + tokenizer_config.json), built from the
files in assets/clip-tokenizer/. Every prompt is encoded three ways: without special
tokens, and padded to 77 (truncation on) once with pad "<|endoftext|>" (SD 1.x, SDXL
text encoder 1) and once with pad "!" (SD 2.x, SDXL text encoder 2).

Usage: /work/pyenv/bin/python tools/make_tokenizer_cases.py
"""
import json
import shutil
import tempfile
from pathlib import Path

import transformers
from transformers import CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets" / "clip-tokenizer"
OUT = ROOT / "tests" / "fixtures" / "tokenizer" / "cases.json"
MAX_LEN = 77

LONG_PROMPT = " ".join(
    f"{word}{i}" if i % 7 == 0 else word
    for i, word in enumerate(
        ("masterpiece best quality highly detailed portrait of a knight in shining armor " * 20)
        .split()[:200]
    )
)

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "   ",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand   runs    of     spaces",
    "Mixed CASE Words And ALLCAPS",
    "punctuation!!! runs??? ... and ,,,;;; -- __ ~~",
    "hello, world. (test) [brackets] {braces}",
    "digits 1234 and 3.14159 and 1,000,000 and 2024-01-01",
    "it's, don't, we're, they've, I'm, you'll, he'd",
    "IT'S DON'T WE'RE",
    "rock'n'roll o'clock 'quoted' \"double\"",
    "café naïve résumé Ångström Über",
    "cafe\u0301 composed by a combining accent",
    "日本語のテキスト 中文 한국어",
    "emoji 🐱🚀 and 👨‍👩‍👧 family and 🇫🇷 flag",
    "a <|endoftext|> in the middle",
    "<|startoftext|>already wrapped<|endoftext|>",
    LONG_PROMPT,
    "html &amp; entities &lt;b&gt; &quot;quoted&quot; &#39;",
    "(masterpiece:1.3), [bad hands], ((best quality)), <lora:foo:0.8>",
    "a_b-c snake_case kebab-case CamelCase",
    "https://example.com/path?query=1&x=y#frag and www.test.org",
    "email me at someone@example.com",
    "ümlaut ß straße ΣΊΣΥΦΟΣ",
    "Ⅻ roman numeral and ½ fraction and ² superscript",
    "full-width ＡＢＣ１２３",
    "zero\u200bwidth space and non\u00a0breaking space",
    "arabic العربية hebrew עברית",
    "math ∑∫√ ≤ ≥ ≠ and symbols ©®™ °C",
    "!",
    "!!",
    "hello! world!",
    "!a!b!c!",
    "'s 't 're alone",
    "x" * 100,
    "a" * 5 + " " + "supercalifragilisticexpialidocious",
    "test.png image_001.jpg",
    "dot...dot,comma",
    "😀",
    "\u00e9\u00e9\u00e9",
]


def load(folder: Path, pad: str) -> CLIPTokenizer:
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ASSETS / name, folder / name)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
        "model_max_length": MAX_LEN,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return CLIPTokenizer.from_pretrained(folder)


def main():
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        eot = load(Path(a), "<|endoftext|>")
        bang = load(Path(b), "!")
        cases = []
        for text in PROMPTS:
            def padded(tok):
                return tok(
                    text, padding="max_length", max_length=MAX_LEN, truncation=True
                )["input_ids"]

            cases.append(
                {
                    "text": text,
                    "ids": eot(text, add_special_tokens=False)["input_ids"],
                    "ids_pad_bang": bang(text, add_special_tokens=False)["input_ids"],
                    "padded_eot": padded(eot),
                    "padded_bang": padded(bang),
                }
            )
    doc = {
        "reference": f"transformers {transformers.__version__} CLIPTokenizer",
        "max_length": MAX_LEN,
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # One case per line keeps the file small and its diffs readable.
    lines = ",\n".join(json.dumps(case, ensure_ascii=False) for case in cases)
    header = json.dumps({k: v for k, v in doc.items() if k != "cases"}, ensure_ascii=False)
    OUT.write_text(header[:-1] + ', "cases": [\n' + lines + "\n]}\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
