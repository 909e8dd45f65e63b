"""References for A1111 prompt syntax and textual-inversion embeddings on the tiny fixtures.

AUTOMATIC1111 is not installable here, so this script carries a small re-implementation of
what its prompt handling does (attention parsing, 75-token chunking with comma backtrack,
BREAK, "Original" emphasis with the mean restored, embeddings matched on token ids and
injected at the token-embedding stage), written from its documented behaviour, and runs
it over transformers' CLIP text encoders of tests/fixtures/{sd1,sdxl}. It also makes random
embedding files and renders images through diffusers' `load_textual_inversion`.

Outputs (deterministic):
  tests/fixtures/embeddings/sd1/tinyemb.safetensors      A1111 layout (emb_params), 2 vectors
  tests/fixtures/embeddings/sdxl/tinyxl.safetensors      SDXL layout (clip_l, clip_g), 2 vectors
  tests/fixtures/reference/prompts_<family>.{safetensors,json}     text conditioning
  tests/fixtures/reference/embeddings_<family>.{safetensors,json}  images via diffusers

Run: /work/pyenv/bin/python tools/make_prompt_fixtures.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import diffusers
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
CHUNK = 75
BACKTRACK = 20

# ---------------------------------------------------------------- A1111 prompt parsing

ATTENTION = re.compile(
    r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:"
)
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[list]:
    out: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for match in ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            out.append([piece[1:], 1.0])
        elif piece == "(":
            rounds.append(len(out))
        elif piece == "[":
            squares.append(len(out))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif piece == ")" and rounds:
            scale(rounds.pop(), 1.1)
        elif piece == "]" and squares:
            scale(squares.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(BREAK.split(piece)):
                if i > 0:
                    out.append(["BREAK", -1])
                out.append([part, 1.0])
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    if not out:
        out = [["", 1.0]]
    merged = [out[0]]
    for item in out[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged


def plan_chunks(tokenizer: CLIPTokenizer, prompt: str, embeddings: dict[str, torch.Tensor]):
    """A1111's tokenize_line: chunks of (tokens, multipliers, fixes[(offset, vectors)])."""
    parsed = parse_attention(prompt)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    names = sorted(
        ((tokenizer(name, add_special_tokens=False).input_ids, vectors) for name, vectors in embeddings.items()),
        key=lambda item: len(item[0]),
        reverse=True,
    )
    chunks = []
    tokens, mults, fixes = [], [], []
    last_comma = -1

    def close():
        nonlocal tokens, mults, fixes, last_comma
        body = tokens + [eos] * (CHUNK - len(tokens))
        chunks.append(([bos] + body + [eos], [1.0] + mults + [1.0] * (CHUNK - len(mults) + 1), fixes))
        tokens, mults, fixes, last_comma = [], [], [], -1

    for text, weight in parsed:
        if text == "BREAK" and weight == -1:
            close()
            continue
        ids = tokenizer(text, add_special_tokens=False).input_ids
        pos = 0
        while pos < len(ids):
            token = ids[pos]
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK and last_comma != -1 and len(tokens) - last_comma <= BACKTRACK:
                cut = last_comma + 1
                moved = (tokens[cut:], mults[cut:])
                assert all(offset < cut for offset, _ in fixes), "reference prompts avoid this"
                tokens, mults = tokens[:cut], mults[:cut]
                close()
                tokens, mults = list(moved[0]), list(moved[1])
            if len(tokens) == CHUNK:
                close()
            found = next(((n, v) for n, v in names if n and ids[pos : pos + len(n)] == n), None)
            if found is None:
                tokens.append(token)
                mults.append(weight)
                pos += 1
                continue
            name_ids, vectors = found
            if len(tokens) + vectors.shape[0] > CHUNK:
                close()
            fixes.append((len(tokens), vectors))
            tokens += [0] * vectors.shape[0]
            mults += [weight] * vectors.shape[0]
            pos += len(name_ids)
    if tokens or not chunks:
        close()
    return chunks


def encode_chunk(encoder, tokenizer, chunk, layer: str):
    tokens, mults, fixes = chunk
    tokens = list(tokens)
    first_end = tokens.index(tokenizer.eos_token_id)
    tokens[first_end + 1 :] = [tokenizer.pad_token_id] * (len(tokens) - first_end - 1)
    ids = torch.tensor([tokens])
    embeds = encoder.get_input_embeddings()(ids)
    for offset, vectors in fixes:
        embeds[0, offset + 1 : offset + 1 + vectors.shape[0]] = vectors
    # transformers pools at the first end token in input_ids; placeholders are 0.
    if fixes:
        out = run_with_embeds(encoder, ids, embeds)
    else:
        out = encoder(input_ids=ids, output_hidden_states=True)
    z = out.last_hidden_state if layer == "last" else out.hidden_states[-2]
    m = torch.tensor(mults, dtype=torch.float32).reshape(1, -1, 1)
    original_mean = z.mean()
    z = z * m
    z = z * (original_mean / z.mean())
    pooled = getattr(out, "text_embeds", None)
    return z, pooled


def run_with_embeds(encoder, ids, token_embeds):
    """Runs a transformers CLIP text model with replaced token embeddings (positions added
    by the model), pooling by `ids`."""
    embedding = encoder.get_input_embeddings()
    handle = embedding.register_forward_hook(lambda module, inputs, output: token_embeds)
    try:
        out = encoder(input_ids=ids, output_hidden_states=True)
    finally:
        handle.remove()
    return out


def encode_prompt(stages, prompt: str, embeddings_per_stage):
    contexts, pooled = [], None
    for (encoder, tokenizer, layer), embeddings in zip(stages, embeddings_per_stage):
        chunks = plan_chunks(tokenizer, prompt, embeddings)
        zs = []
        for i, chunk in enumerate(chunks):
            z, p = encode_chunk(encoder, tokenizer, chunk, layer)
            zs.append(z)
            if i == 0 and p is not None:
                pooled = p
        contexts.append(torch.cat(zs, dim=1))
    return torch.cat(contexts, dim=-1), pooled


# ---------------------------------------------------------------- fixtures

TEXT_PROMPTS = {
    "weights": "a (red:1.3) [[fox]], ((forest)) at dusk, (unclosed",
    "break": "a cat sitting BREAK (a dog:0.8) running",
    "long": ", ".join(f"word{i} (detail {i}:1.1)" for i in range(30)),
    "long_plain": " ".join(["lighthouse"] * 80) + ", harbour, " + " ".join(["boats"] * 10),
    "plain": "a photo of an astronaut riding a horse",
    "embedding": "a (TOKEN:1.2) photo, TOKEN and [friends]",
}


def make_embedding(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"sd_checkpoint_name": "tiny-fixture", "made_by": "tools/make_prompt_fixtures.py"})


def text_references(family: str, folder: Path, token: str, per_stage: list[dict]) -> None:
    if family == "sd1":
        stages = [
            (CLIPTextModel.from_pretrained(folder / "text_encoder").float().eval(), CLIPTokenizer.from_pretrained(folder / "tokenizer"), "last")
        ]
    else:
        stages = [
            (CLIPTextModel.from_pretrained(folder / "text_encoder").float().eval(), CLIPTokenizer.from_pretrained(folder / "tokenizer"), "penultimate"),
            (
                CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").float().eval(),
                CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
                "penultimate",
            ),
        ]
    refs, prompts = {}, {}
    with torch.no_grad():
        for name, prompt in TEXT_PROMPTS.items():
            prompt = prompt.replace("TOKEN", token)
            uses = token in prompt
            context, pooled = encode_prompt(stages, prompt, per_stage if uses else [{}] * len(stages))
            refs[f"{name}.context"] = context.contiguous()
            if pooled is not None:
                refs[f"{name}.pooled"] = pooled.contiguous()
            prompts[name] = prompt
            print(f"  {family}/{name}: context {list(context.shape)}")
    save_file(refs, str(FIXTURES / "reference" / f"prompts_{family}.safetensors"))
    meta = {"family": family, "prompts": prompts, "embeddings_dir": f"embeddings/{family}", "versions": versions()}
    (FIXTURES / "reference" / f"prompts_{family}.json").write_text(json.dumps(meta, indent=2) + "\n")


def versions() -> dict:
    return {"torch": torch.__version__, "diffusers": diffusers.__version__}


IMAGE_CASE = {
    "sampler": "euler",
    "steps": 5,
    "guidance_scale": 7.5,
    "seed": 42,
    "width": 64,
    "height": 64,
    "prompt": "a photo of TOKEN riding a horse",
    "negative_prompt": "blurry, TOKEN, low quality",
}


def image_reference(family: str, folder: Path, token: str, file: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(file))
    if family == "sd1":
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
        pipe.load_textual_inversion(state["emb_params"], token=token)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
        pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    case = {k: (v.replace("TOKEN", token) if isinstance(v, str) else v) for k, v in IMAGE_CASE.items()}
    outputs = {}
    for output_type in ("np", "latent"):
        with torch.no_grad():
            outputs[output_type] = pipe(
                prompt=case["prompt"],
                negative_prompt=case["negative_prompt"],
                num_inference_steps=case["steps"],
                guidance_scale=case["guidance_scale"],
                width=case["width"],
                height=case["height"],
                generator=torch.Generator("cpu").manual_seed(case["seed"]),
                output_type=output_type,
            ).images
    image = np.round(outputs["np"] * 255.0).astype(np.uint8)
    refs = {"image": torch.from_numpy(np.ascontiguousarray(image)), "latents": outputs["latent"].float().contiguous()}
    save_file(refs, str(FIXTURES / "reference" / f"embeddings_{family}.safetensors"))
    meta = {"family": family, "case": case, "embeddings_dir": f"embeddings/{family}", "token": token, "versions": versions()}
    (FIXTURES / "reference" / f"embeddings_{family}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"  {family}: image mean {image.mean():.1f} std {image.std():.1f}")


def main() -> None:
    generator = torch.Generator("cpu").manual_seed(1234)
    sd1_token, sdxl_token = "tinyemb", "tinyxl"
    # Scaled like real token embeddings of the tiny encoders (std ~0.02 init → larger here
    # so the images visibly depend on them).
    sd1_vectors = torch.randn(2, 32, generator=generator) * 0.5
    sd1_file = FIXTURES / "embeddings" / "sd1" / f"{sd1_token}.safetensors"
    make_embedding(sd1_file, {"emb_params": sd1_vectors})
    clip_l = torch.randn(2, 32, generator=generator) * 0.5
    clip_g = torch.randn(2, 32, generator=generator) * 0.5
    sdxl_file = FIXTURES / "embeddings" / "sdxl" / f"{sdxl_token}.safetensors"
    make_embedding(sdxl_file, {"clip_l": clip_l, "clip_g": clip_g})

    text_references("sd1", FIXTURES / "sd1", sd1_token, [{sd1_token: sd1_vectors}])
    text_references("sdxl", FIXTURES / "sdxl", sdxl_token, [{sdxl_token: clip_l}, {sdxl_token: clip_g}])
    image_reference("sd1", FIXTURES / "sd1", sd1_token, sd1_file)
    image_reference("sdxl", FIXTURES / "sdxl", sdxl_token, sdxl_file)


if __name__ == "__main__":
    main()
