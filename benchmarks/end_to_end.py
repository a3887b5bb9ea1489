"""Text to image end to end through the public API, against transformers' Janus, in one run.

unimm: ``UniMMPipeline.generate_images(prompts, guidance_scale=..., seed=...)`` with its defaults otherwise -
the prompts tokenized by the processor, one guided and constrained LLM call for the batch, then the image
decode - with the tokenizer's pixel decoder and with the diffusion decoder (its default steps), eager and after
``pipe.enable_compile()``. Janus: ``JanusForConditionalGeneration.generate(generation_mode="image")`` on
token ids (its prompt is not even tokenized: that is in Janus's favour) followed by
``decode_image_tokens``, its VQ decoder. The models are matched: the same Llama backbone (hidden 256, MLP 1024,
4 layers, 8 heads), codebook 4096, a 16x16 grid, guidance 5, sampling at temperature 1; both decoders turn a
16x16 grid into 64x64 pixels through convolutional upsampling of similar width (unimm's pixel decoder 16-64
channels, Janus's VQ decoder 32-64). The weights are random: speed does not depend on them.

Images per CPU-second of this process (one torch thread; the wall-clock ratio beside it), median of
``--repeats`` interleaved runs after a warm-up round that also holds the compile. The share of the decode is
printed on its own rows (images per CPU-second of the decode alone, both sides).

    python benchmarks/end_to_end.py [--batch-sizes 1 16] [--repeats 3] [--device cuda]

Figures, the 2-core AMD EPYC while four other jobs ran on it (load average 5-7; CPU time is what such a load
disturbs least, but the compiled decode step, bound by memory, loses most to it: on a quiet machine it wrote image
tokens 3.4-3.65x as fast as Janus at batch 1, ``benchmarks/generation.py``), ``--repeats 3``, images per
CPU-second over Janus's (wall-clock ratio in brackets):

| batch | pixel, eager | pixel, compiled | diffusion, eager | diffusion, compiled |
|---|---|---|---|---|
| 1 | 1.16x (1.15x) | 2.59x (2.68x) | 0.43x | 0.55x |
| 16 | 1.18x (1.14x) | 1.35x (1.17x) | 0.09x | 0.10x |

The decode alone: the pixel decoder 3.60x / 3.85x Janus's VQ decoder at batch 1 / 16; the diffusion decoder
(64 px, 20 steps, guidance) about 5 CPU-seconds an image. Outside the engine the pipeline adds nothing measurable:
``generate_images`` at batch 1 took 1.12 CPU-s against 1.17 for ``generate_multimodal`` on the same prompt.
"""

from __future__ import annotations

import argparse

import torch
from clocks import Clock, add_device_argument
from diffusers import DDIMScheduler
from generation import interleaved_rates, llama_config, ratio
from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration

from unimm.detokenizer import DetokenizerPipeline, TokenDiffusionDecoder
from unimm.llm import UniMMConfig, UniMMForCausalLM, UniMMProcessor
from unimm.pipelines import UniMMPipeline
from unimm.pipelines.testing import RANDOM_PIPELINE_SIZES, build_text_tokenizer
from unimm.tokenizer import DualCodebookConfig, DualCodebookImageProcessor, DualCodebookTokenizer

# A prompt of 12 words from the random pipeline's vocabulary; Janus gets as many random token ids.
PROMPT = "please draw a photo of a small red cat face smiling here"
# Pixels per code side on both sides: a 16x16 grid decodes to 64x64 pixels.
PIXELS_PER_CODE = 4


def build_janus(args: argparse.Namespace) -> JanusForConditionalGeneration:
    config = JanusConfig(
        text_config=llama_config(args).to_dict(),
        vision_config=dict(
            hidden_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=args.grid * PIXELS_PER_CODE,
            patch_size=PIXELS_PER_CODE,
            projection_dim=args.hidden, num_image_tokens=args.grid * args.grid,
        ),
        # Three resolutions: two 2x upsamplings, 16x16 codes to 64x64 pixels.
        vq_config=dict(
            embed_dim=8, num_embeddings=args.codebook, projection_dim=args.hidden,
            image_token_embed_dim=args.hidden, base_channels=32, channel_multiplier=[1, 2, 2], num_res_blocks=1,
            latent_channels=16, num_patches=args.grid,
        ),
        image_token_id=args.text_vocab - 1,
    )  # fmt: skip
    model = JanusForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=1, pad_token_id=0, eos_token_id=2, generation_kwargs={"boi_token_id": 3}
    )
    return model


def build_pipeline(args: argparse.Namespace) -> UniMMPipeline:
    """The random pipeline of ``unimm.pipelines.testing`` at the matched sizes."""
    visual_tokenizer = DualCodebookTokenizer(
        DualCodebookConfig.named(
            "demo", codebook_size=args.codebook, image_size=args.grid * PIXELS_PER_CODE, downsample_factor=4
        )
    ).eval()
    text_tokenizer = build_text_tokenizer(args.text_vocab)
    config = UniMMConfig(
        text_config=llama_config(args),
        codebook_size=args.codebook,
        max_grid_height=args.grid,
        max_grid_width=args.grid,
        default_grid_height=args.grid,
        default_grid_width=args.grid,
    )
    image_processor = DualCodebookImageProcessor.from_tokenizer_config(visual_tokenizer.config)
    spec = RANDOM_PIPELINE_SIZES["demo"]
    decoder = TokenDiffusionDecoder.from_tokenizer(
        visual_tokenizer, sample_size=visual_tokenizer.config.image_size, **spec["unet"]
    ).eval()
    scheduler = DDIMScheduler(
        num_train_timesteps=spec["num_train_timesteps"],
        prediction_type=decoder.config.prediction_type,
        clip_sample=False,
    )
    pipeline = UniMMPipeline(
        llm=UniMMForCausalLM(config).eval(),
        processor=UniMMProcessor.from_config(config, text_tokenizer, image_processor),
        visual_tokenizer=visual_tokenizer,
        detokenizer=DetokenizerPipeline(decoder=decoder, scheduler=scheduler),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def bench(args, clock: Clock, janus, pipeline: UniMMPipeline, batch: int) -> dict[str, tuple[float, float]]:
    prompt_ids = torch.randint(4, args.text_vocab - 1, (batch, len(PROMPT.split()) + 1), device=clock.device)
    prompt_ids[:, 0], prompt_ids[:, -1] = 1, 3  # BOS ... Janus's <begin_of_image>
    mask = torch.ones_like(prompt_ids)

    def run_janus(seed: int) -> None:
        torch.manual_seed(seed)
        output = janus.generate(
            prompt_ids, attention_mask=mask, generation_mode="image", do_sample=True, temperature=1.0,
            guidance_scale=args.guidance,
        )  # fmt: skip
        janus.decode_image_tokens(output)

    def unimm_runner(decoder: str, compile: bool):
        def run_unimm(seed: int) -> None:
            pipeline.enable_compile(compile)
            pipeline.generate_images(
                [PROMPT] * batch, guidance_scale=args.guidance, seed=seed, decoder=decoder
            )

        return run_unimm

    runners = {"janus": run_janus}
    for decoder in args.decoders:
        runners[f"unimm {decoder}"] = unimm_runner(decoder, False)
        runners[f"unimm {decoder} compiled"] = unimm_runner(decoder, True)
    return interleaved_rates(clock, runners, args.repeats, batch)


def bench_decoders(args, clock: Clock, janus, pipeline: UniMMPipeline, batch: int) -> dict:
    """The decode alone: Janus's VQ decoder against unimm's pixel and diffusion decoders, on random codes."""
    codes = torch.randint(0, args.codebook, (batch, args.grid, args.grid), device=clock.device)
    runners = {"janus": lambda seed: janus.decode_image_tokens(codes.flatten(1))}
    if "pixel" in args.decoders:
        runners["unimm pixel"] = lambda seed: pipeline.decode(list(codes), decoder="pixel")
    if "diffusion" in args.decoders:
        runners["unimm diffusion"] = lambda seed: pipeline.decode(list(codes), decoder="diffusion", seed=seed)
    return interleaved_rates(clock, runners, args.repeats, batch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_device_argument(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--decoders", nargs="+", choices=("pixel", "diffusion"), default=["pixel", "diffusion"],
        help="unimm's decoders to time (the diffusion decoder takes seconds an image on a CPU)",
    )  # fmt: skip
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 4 x hidden)")
    parser.add_argument("--text-vocab", type=int, default=2048)
    parser.add_argument("--codebook", type=int, default=4096)
    parser.add_argument("--grid", type=int, default=16, help="image side in codes (grid x grid tokens)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on a CPU (1 keeps a shared CPU steadier)"
    )
    args = parser.parse_args(argv)
    clock = Clock(torch.device(args.device))
    clock.pin_threads(args.threads)
    torch.manual_seed(0)
    janus = build_janus(args).to(clock.device)
    pipeline = build_pipeline(args).to(clock.device)
    print(
        f"Llama backbone: hidden {args.hidden}, {args.layers} layers, {args.heads} heads; {args.grid}x{args.grid} "
        f"codes of {args.codebook} to {args.grid * PIXELS_PER_CODE} px, guidance {args.guidance}; "
        f"{clock.describe()}; median of {args.repeats} interleaved runs after a warm-up round (compile included)"
    )
    columns = [name for decoder in args.decoders for name in (decoder, f"{decoder} compiled")]
    print(
        f"\n| batch | Janus (img/{clock.unit}) | "
        + " | ".join(f"unimm {name} (img/{clock.unit}) | ratio" for name in columns)
        + " |"
    )
    print("|---" * (2 + 2 * len(columns)) + "|", flush=True)
    with torch.no_grad():  # not inference_mode: its tensors break the compiled step
        for batch in args.batch_sizes:
            rates = bench(args, clock, janus, pipeline, batch)
            cells = [f"{rates['janus'][0]:.2f}"]
            for name in columns:
                rate = rates[f"unimm {name}"]
                cells += [f"{rate[0]:.2f}", f"**{ratio(rate, rates['janus'], clock)}**"]
            print(f"| {batch} | " + " | ".join(cells) + " |", flush=True)
        print(
            f"\n| decode alone, batch | Janus VQ (img/{clock.unit}) | "
            + " | ".join(f"unimm {decoder} | ratio" for decoder in args.decoders)
            + " |"
        )
        print("|---" * (2 + 2 * len(args.decoders)) + "|", flush=True)
        for batch in args.batch_sizes:
            rates = bench_decoders(args, clock, janus, pipeline, batch)
            cells = [f"{rates['janus'][0]:.1f}"]
            for name in args.decoders:
                rate = rates[f"unimm {name}"]
                cells += [f"{rate[0]:.1f}", ratio(rate, rates["janus"], clock)]
            print(f"| {batch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
