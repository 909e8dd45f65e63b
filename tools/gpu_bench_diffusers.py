"""Time diffusers on a GPU, part by part, printing lines in `sdserve bench`'s format so
that tools/gpu_check.sh can put both side by side.

Parts (as `sdserve bench`): text encoder (one prompt, both encoders for SDXL), one UNet
step at batch 1 and 2 (2 = one image with guidance), VAE decode (float32 when an SDXL
pipeline in float16 has a force_upcast VAE, as diffusers' SDXL pipeline does), and a
whole request (Euler, --steps steps, guidance, CPU generator seeded 0 as sdserve's
torch-compatible generator). Each part: one warm-up, then --repeats timed runs with
torch.cuda.synchronize() around each; the request is timed once after its warm-up.
Attention is diffusers' default (PyTorch scaled_dot_product_attention: flash/memory-
efficient kernels).

Usage: python tools/gpu_bench_diffusers.py --model /tmp/sd15 --size 512 --dtype fp16 --steps 30
"""
import argparse
import statistics
import time

import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler

PROMPT = "a photo of an astronaut riding a horse"


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(repeats, run):
    run()
    synchronize()
    seconds = []
    for _ in range(max(repeats, 1)):
        started = time.perf_counter()
        run()
        synchronize()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), min(seconds), max(seconds)


def report(part, times):
    median, low, high = times
    # The columns `sdserve bench` prints; CPU time and FLOPs are not measured here.
    print(f"{part:<32} median {median:>8.3f} s   min {low:>8.3f} s   max {high:>8.3f} s   "
          f"cpu {float('nan'):>8.3f} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--size", type=int, action="append")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to try the script on a tiny model)")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.set_grad_enabled(False)
    device = torch.device(args.device)

    loading = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    sdxl = hasattr(pipe, "text_encoder_2")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"diffusers {type(pipe).__name__} dtype {args.dtype} on {gpu}, "
          f"torch {torch.__version__}, loaded in {time.perf_counter() - loading:.1f} s", flush=True)

    def encode():
        if sdxl:
            return pipe.encode_prompt(PROMPT, device=device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)
        return pipe.encode_prompt(PROMPT, device, 1, False)

    report("text encoder (prompt)", timed(args.repeats, encode))
    encoded = encode()
    context = encoded[0]
    pooled = encoded[2] if sdxl else None
    unet, vae = pipe.unet, pipe.vae
    # As the pipelines decode: SDXL's upcast a force_upcast VAE from fp16, SD 1.x/2.x's never.
    upcast_vae = sdxl and vae.dtype == torch.float16 and vae.config.force_upcast
    decode_vae = vae.to(torch.float32) if upcast_vae else vae
    for size in args.size or [512]:
        latent = size // 8
        for batch in (1, 2):
            sample = torch.zeros(batch, unet.config.in_channels, latent, latent, device=device, dtype=dtype)
            hidden = context.repeat(batch, 1, 1)
            kwargs = {}
            if sdxl:
                time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype)
                kwargs["added_cond_kwargs"] = {
                    "text_embeds": pooled.repeat(batch, 1),
                    "time_ids": time_ids.repeat(batch, 1),
                }
            timestep = torch.tensor(500.0, device=device)
            report(f"unet step {size}x{size} batch {batch}",
                   timed(args.repeats, lambda: unet(sample, timestep, encoder_hidden_states=hidden, **kwargs)))
        latents = torch.zeros(1, vae.config.latent_channels, latent, latent, device=device,
                              dtype=decode_vae.dtype)
        report(f"vae decode {size}x{size}",
               timed(args.repeats, lambda: decode_vae.decode(latents / vae.config.scaling_factor)))
        if upcast_vae:
            vae.to(torch.float16)  # the pipeline upcasts on its own during the request
        if args.steps > 0:
            def request():
                generator = torch.Generator("cpu").manual_seed(0)
                return pipe(PROMPT, height=size, width=size, num_inference_steps=args.steps,
                            generator=generator, output_type="np")
            report(f"request {size}x{size}, {args.steps} steps, cfg", timed(1, request))
        if upcast_vae:
            decode_vae = vae.to(torch.float32)
    if device.type == "cuda":
        print(f"peak GPU memory allocated by torch {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
