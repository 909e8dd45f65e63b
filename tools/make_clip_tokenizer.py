"""Build the standard CLIP BPE tokenizer files (vocab.json + merges.txt, 49408 tokens).

The OpenAI CLIP merges ship inside the `open-clip-torch` wheel as
`open_clip/bpe_simple_vocab_16e6.txt.gz`. This script derives from them the two files
a Hugging Face `CLIPTokenizer` reads, in the same layout as the files published with
`openai/clip-vit-large-patch14`, and writes them to `assets/clip-tokenizer/`.

Usage: pip download --no-deps -d /tmp/oc open-clip-torch
       python tools/make_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl
"""
import gzip
import json
import sys
import zipfile
from pathlib import Path


def byte_to_unicode():
    """The reversible byte -> printable character table used by GPT-2 and CLIP BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in chars]))


def main():
    wheel = Path(sys.argv[1])
    out = Path(__file__).resolve().parent.parent / "assets" / "clip-tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        raw = z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    # Line 0 is a header; CLIP uses the next 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(byte_to_unicode().values())
    vocab = base + [b + "</w>" for b in base]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    (out / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    print(f"wrote {out}/vocab.json and merges.txt ({len(vocab)} tokens, {len(merges)} merges)")


if __name__ == "__main__":
    main()
