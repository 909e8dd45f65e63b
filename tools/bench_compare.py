"""Time sdserve against diffusers (PyTorch, float32, CPU) on the same diffusers folder.

Runs `sdserve bench` and the same parts in diffusers in alternating rounds, so both see
the same machine load, and prints per part the median wall time and the median CPU time
(all threads of the process) of each, and sdserve / diffusers. On a shared machine the
CPU-time ratio is the steadier one; on an idle machine both should agree.

Parts: text encoder (one prompt), UNet step at batch 1 and 2 (2 = one image with
guidance) and VAE decode, at each --size. Nothing is downloaded; the model folder comes
from tools/make_random_sd15.py (random weights are fine for timing).

With --bf16 a further sdserve side runs with `--cpu-matmul bf16` (bf16 products, f32
accumulation; see README) in the same rounds, reported in its own labelled columns.

With --candle-bench PATH (the binary of tools/candle_sd_bench, candle-transformers' own
SD 1.5 UNet and VAE) a third side joins the same rounds (UNet steps and VAE decodes only;
it has no text encoder part) and the table adds its times and its ratios to diffusers.

Usage:
  python tools/bench_compare.py --model /tmp/sd15-random --sdserve target/release/sdserve \
      --size 256 --size 512 --rounds 3 --threads 2 \
      [--candle-bench /work/target-candlebench/debug/candle_sd_bench]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="diffusers folder (unet/, vae/, text_encoder/, tokenizer/)")
    parser.add_argument("--sdserve", default="target/release/sdserve", help="sdserve binary")
    parser.add_argument("--size", type=int, action="append", help="square image size (repeatable), default 256")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; each times every part once per side")
    parser.add_argument("--threads", type=int, default=2, help="threads for both sides")
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--skip-sdserve", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="also time sdserve with --cpu-matmul bf16 (labelled columns)")
    parser.add_argument("--candle-bench", help="tools/candle_sd_bench binary: adds candle-transformers as a third side")
    return parser.parse_args()


def sdserve_round(args, sizes, extra=()):
    """One `sdserve bench --repeats 1` run; returns {part: (wall, cpu)}."""
    command = [args.sdserve, "bench", "--model", args.model, "--repeats", "1", "--request-steps", "0", *extra]
    return bench_lines_round(command, args.threads, sizes)


def candle_round(args, sizes):
    """One tools/candle_sd_bench run (same line format as `sdserve bench`)."""
    command = [args.candle_bench, "--model", args.model, "--repeats", "1"]
    return bench_lines_round(command, args.threads, sizes)


def bench_lines_round(command, threads, sizes):
    """Runs a binary that prints `sdserve bench` lines; returns {part: (wall, cpu)}."""
    command = list(command)
    for size in sizes:
        command += ["--size", str(size)]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    parts = {}
    line_format = re.compile(r"^(.*?)\s+median\s+([\d.]+) s.*?cpu\s+([\d.]+) s")
    for line in output.splitlines():
        match = line_format.match(line)
        if match:
            parts[normalise(match.group(1))] = (float(match.group(2)), float(match.group(3)))
    return parts


def normalise(name):
    name = name.strip()
    if name.startswith("text encoder"):
        return "text encoder"
    return name


class Diffusers:
    """The diffusers side, loaded once; each call times one run of a part."""

    def __init__(self, model, threads):
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        self.torch = torch
        self.unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").eval()
        self.vae = AutoencoderKL.from_pretrained(model, subfolder="vae").eval()
        self.text = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        self.context = None

    def timed(self, run):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        return time.perf_counter() - wall, time.process_time() - cpu

    def text_encoder(self):
        tokens = self.tokenizer(
            "a photo of an astronaut riding a horse",
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids

        def run():
            self.context = self.text(tokens)[0]

        return self.timed(run)

    def unet_step(self, size, batch):
        torch = self.torch
        if self.context is None:
            self.text_encoder()
        sample = torch.zeros(batch, self.unet.config.in_channels, size // 8, size // 8)
        context = self.context.repeat(batch, 1, 1)
        timestep = torch.tensor(500.0)
        return self.timed(lambda: self.unet(sample, timestep, encoder_hidden_states=context))

    def vae_decode(self, size):
        torch = self.torch
        latents = torch.zeros(1, self.vae.config.latent_channels, size // 8, size // 8)
        return self.timed(lambda: self.vae.decode(latents / self.vae.config.scaling_factor))

    def round(self, sizes):
        parts = {"text encoder": self.text_encoder()}
        for size in sizes:
            for batch in (1, 2):
                parts[f"unet step {size}x{size} batch {batch}"] = self.unet_step(size, batch)
            parts[f"vae decode {size}x{size}"] = self.vae_decode(size)
        return parts


def main():
    args = parse_args()
    sizes = args.size or [256]
    results = {"sdserve": {}, "diffusers": {}, "candle": {}, "bf16": {}}
    diffusers = None
    if not args.skip_diffusers:
        diffusers = Diffusers(args.model, args.threads)
        diffusers.round(sizes)  # warm-up, like sdserve bench's untimed first run
    for round_index in range(args.rounds):
        sides = []
        if not args.skip_sdserve:
            sides.append(("sdserve", lambda: sdserve_round(args, sizes)))
        if diffusers is not None:
            sides.append(("diffusers", lambda: diffusers.round(sizes)))
        if args.candle_bench:
            sides.append(("candle", lambda: candle_round(args, sizes)))
        if args.bf16:
            sides.append(("bf16", lambda: sdserve_round(args, sizes, ("--cpu-matmul", "bf16"))))
        if round_index % 2 == 1:
            sides.reverse()
        for side, run in sides:
            for part, timing in run().items():
                results[side].setdefault(part, []).append(timing)
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    parts = list(results["diffusers"] or results["sdserve"])
    for part in list(results["sdserve"]) + list(results["candle"]):
        if part not in parts:
            parts.append(part)
    print(f"threads {args.threads}, rounds {args.rounds}; medians in seconds (wall / CPU of all threads)")
    if args.candle_bench:
        print_three_sides(results, parts)
        return
    bf16_header = f" {'bf16 wall':>10} {'bf16 cpu':>9} {'bf16/diff wall':>15}" if args.bf16 else ""
    print(f"{'part':<28} {'sdserve wall':>12} {'sdserve cpu':>12} {'diffusers wall':>15} {'diffusers cpu':>14} {'ratio wall':>11} {'ratio cpu':>10}{bf16_header}")
    for part in parts:
        ours = results["sdserve"].get(part)
        theirs = results["diffusers"].get(part)
        med = lambda runs, i: statistics.median(r[i] for r in runs) if runs else float("nan")
        ow, oc, tw, tc = med(ours, 0), med(ours, 1), med(theirs, 0), med(theirs, 1)
        bf16 = ""
        if args.bf16:
            bw, bc = med(results["bf16"].get(part), 0), med(results["bf16"].get(part), 1)
            bf16 = f" {bw:>10.3f} {bc:>9.3f} {bw / tw:>15.2f}"
        print(f"{part:<28} {ow:>12.3f} {oc:>12.3f} {tw:>15.3f} {tc:>14.3f} {ow / tw:>11.2f} {oc / tc:>10.2f}{bf16}")


def print_three_sides(results, parts):
    """The table with candle-transformers: each side's medians, then sdserve / diffusers and
    candle / diffusers (wall and CPU)."""
    med = lambda runs, i: statistics.median(r[i] for r in runs) if runs else float("nan")
    ratio = lambda a, b: a / b if b == b and b != 0 else float("nan")
    print(
        f"{'part':<28} {'sdserve wall':>12} {'sdserve cpu':>12} {'diffusers wall':>15} {'diffusers cpu':>14}"
        f" {'candle wall':>12} {'candle cpu':>11} {'sds/diff wall':>14} {'sds/diff cpu':>13}"
        f" {'cndl/diff wall':>15} {'cndl/diff cpu':>14}"
    )
    for part in parts:
        ow, oc = med(results["sdserve"].get(part), 0), med(results["sdserve"].get(part), 1)
        tw, tc = med(results["diffusers"].get(part), 0), med(results["diffusers"].get(part), 1)
        cw, cc = med(results["candle"].get(part), 0), med(results["candle"].get(part), 1)
        print(
            f"{part:<28} {ow:>12.3f} {oc:>12.3f} {tw:>15.3f} {tc:>14.3f} {cw:>12.3f} {cc:>11.3f}"
            f" {ratio(ow, tw):>14.2f} {ratio(oc, tc):>13.2f} {ratio(cw, tw):>15.2f} {ratio(cc, tc):>14.2f}"
        )


if __name__ == "__main__":
    main()
