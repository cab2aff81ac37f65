"""Inference throughput: encoding, decoding and sampling in images/s, and seconds per generated 256x256 slice.

The models are the default VQ-VAE and PixelCNN prior with random weights: how fast they run does not depend on
the weights (sampling draws codes from whatever the prior predicts; the work per position is the same). Each
operation is run the way brainvq runs it:

- `encode`: as `codes.encode_dataset` (used by `train-prior`): the VQ-VAE prepared for bf16 (channels_last),
  bf16 autocast, `VQVAE.encode`, batches of 32;
- `decode (bf16, channels_last)`: as `reconstruction.reconstruct_batches` (`evaluate`, `reconstruct`);
- `decode (fp32, as generate)` and `sample (fast)`: as `api.generate` (`brainvq sample`), which loads both models
  in fp32 on the CPU without autocast and calls `sampling.sample_fast`, then `VQVAE.decode`;
- `end to end`: sampling plus decoding of a batch, exactly the timed part of `api.generate`, for a batch of 16
  and for a single image.

Operations are interleaved over rounds; the table gives medians. Target: a batch of 16 new slices, fast sampling
of 64x64 code grids plus decoding, in under 10 s. Run from the repository root:

    python benchmarks/inference.py [--rounds 3] [--encode-batches 4] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import (
    CpuShare,
    add_output_arguments,
    environment,
    interleaved,
    json_path,
    median,
    seconds,
    table,
    verdict,
    write_json,
)

from brainvq.config import VQVAEConfig
from brainvq.models.pixelcnn import GatedPixelCNN, PixelCNNConfig
from brainvq.models.vqvae import VQVAE
from brainvq.runtime import autocast, prepare_images, prepare_module
from brainvq.sampling import draw_uniforms, sample_fast

TARGET_BATCH_SECONDS = 10.0
ENCODE_BATCH = 32  # codes.encode_dataset's and reconstruction.reconstruct_batches' batch size
GENERATE_BATCH = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--encode-batches", type=int, default=4, help="batches of 32 per round for encode/decode")
    add_output_arguments(parser, "inference")
    args = parser.parse_args()
    vqvae_config, prior_config = VQVAEConfig(), PixelCNNConfig()
    if args.quick:
        args.rounds, args.encode_batches = 1, 1
        vqvae_config, prior_config = VQVAEConfig(image_size=32), PixelCNNConfig(grid_size=8)
    env = environment(args)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    size, grid = vqvae_config.image_size, vqvae_config.grid_size

    # As api.generate: models loaded in fp32 on the CPU, eval mode.
    vqvae_fp32 = VQVAE(vqvae_config).eval()
    prior = GatedPixelCNN(prior_config).eval()
    # As codes.encode_dataset / reconstruct_batches after api._ready_vqvae: prepared for bf16.
    vqvae_bf16 = prepare_module(VQVAE(vqvae_config), cpu, "bf16").eval()
    vqvae_bf16.load_state_dict(vqvae_fp32.state_dict())
    images = torch.rand(ENCODE_BATCH, 1, size, size)
    codes = torch.randint(0, vqvae_config.codebook_size, (ENCODE_BATCH, grid, grid))

    @torch.no_grad()
    def encode() -> float:
        def run() -> None:
            for _ in range(args.encode_batches):
                with autocast(cpu, "bf16"):
                    vqvae_bf16.encode(prepare_images(images, cpu, "bf16"))
        return args.encode_batches * ENCODE_BATCH / seconds(run)

    @torch.no_grad()
    def decode(model: VQVAE, precision: str) -> Callable[[], float]:
        def run() -> None:
            for _ in range(args.encode_batches):
                with autocast(cpu, precision):
                    model.decode(codes)
        return lambda: args.encode_batches * ENCODE_BATCH / seconds(run)

    generated: dict[int, dict[str, list[float]]] = {}

    def generate(batch: int) -> Callable[[], float]:
        """One timed generation as api.generate; returns its total seconds, records the two parts."""
        def run() -> float:
            generator = torch.Generator().manual_seed(len(generated.get(batch, {}).get("total", [])))
            positions = torch.randint(0, prior_config.positions, (batch,), generator=generator)
            uniforms = draw_uniforms(batch, grid, generator)
            result: dict[str, torch.Tensor] = {}
            sample_seconds = seconds(lambda: result.setdefault("codes", sample_fast(prior, uniforms, positions)))
            decode_seconds = seconds(lambda: vqvae_fp32.decode(result["codes"])[0].cpu())
            parts = generated.setdefault(batch, {"sample": [], "decode": [], "total": []})
            parts["sample"].append(sample_seconds)
            parts["decode"].append(decode_seconds)
            parts["total"].append(sample_seconds + decode_seconds)
            return sample_seconds + decode_seconds
        return run

    measures = {"encode": encode, "decode bf16": decode(vqvae_bf16, "bf16"), "decode fp32": decode(vqvae_fp32, "fp32"),
                f"generate {GENERATE_BATCH}": generate(GENERATE_BATCH), "generate 1": generate(1)}
    for measure in measures.values():  # warm-up
        measure()
    generated.clear()
    with CpuShare() as share:
        rounds = interleaved(measures, args.rounds)

    batch16, single = generated[GENERATE_BATCH], generated[1]
    sample_rate = GENERATE_BATCH / median(batch16["sample"])
    rows = [
        ["encode (bf16, channels_last)", ENCODE_BATCH, median(rounds["encode"]), ""],
        ["decode (bf16, channels_last)", ENCODE_BATCH, median(rounds["decode bf16"]), ""],
        ["decode (fp32, as generate)", ENCODE_BATCH, median(rounds["decode fp32"]), ""],
        [f"sample (fast, {grid}x{grid} codes)", GENERATE_BATCH, sample_rate, median(batch16["sample"])],
        ["decode of the samples (fp32)", GENERATE_BATCH, GENERATE_BATCH / median(batch16["decode"]),
         median(batch16["decode"])],
        ["end to end (sample + decode)", GENERATE_BATCH, GENERATE_BATCH / median(batch16["total"]),
         median(batch16["total"])],
        ["end to end, one image", 1, 1 / median(single["total"]), median(single["total"])],
    ]
    batch_seconds = median(batch16["total"])
    holds = batch_seconds < TARGET_BATCH_SECONDS
    print(f"\ninference, random weights, {env['machine']}, torch {env['torch']}, {env['threads']} threads; "
          f"medians of {args.rounds} rounds")
    print(table(["operation", "batch", "images/s", "s per batch"], rows))
    print(f"seconds per generated image (batch of {GENERATE_BATCH}): {batch_seconds / GENERATE_BATCH:.3f}; "
          f"one image alone: {median(single['total']):.2f} s")
    print(share.line())
    print(f"target: batch of {GENERATE_BATCH} new {size}x{size} slices in under {TARGET_BATCH_SECONDS:.0f} s: "
          f"{batch_seconds:.2f} s, {verdict(holds)}")
    write_json(json_path(args, "inference"), {
        "benchmark": "inference", **env, "quick": args.quick, "rounds": args.rounds, "weights": "random",
        "cpu_share": share.record(),
        "image_size": size, "grid_size": grid, "images_per_second": rounds,
        "generate_seconds": {str(batch): parts for batch, parts in generated.items()},
        "seconds_per_generated_image": batch_seconds / GENERATE_BATCH, "seconds_per_batch_of_16": batch_seconds,
        "seconds_single_image": median(single["total"]),
        "target": {"name": f"batch of {GENERATE_BATCH} in < {TARGET_BATCH_SECONDS} s", "holds": holds}})


if __name__ == "__main__":
    main()
