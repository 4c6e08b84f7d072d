"""Build the diffusers pipeline for a model config: a hub id, a local directory, or "tiny".

The tiny models have the real architectures (SDXL: two text encoders, pooled embeddings and
size conditioning; SD 1.5: one encoder), at sizes that run in milliseconds on a CPU. Their
weights are random, seeded and built in code, so tests and the demo need no download.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from omegaconf import DictConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ghibli_lab.hub import BUILT_IN_CODE, OfflineError, check_hub_resource

PIPELINE_CLASSES = {"sdxl": StableDiffusionXLPipeline, "sd15": StableDiffusionPipeline}
SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
TINY_SEED = 0  # fixed, so the "base model" is the same in every run and every sweep


DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def is_sdxl(pipe: DiffusionPipeline) -> bool:
    """SDXL (two text encoders, pooled embeddings, size conditioning) rather than SD 1.5."""
    return getattr(pipe, "text_encoder_2", None) is not None


def weight_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The frozen weights' dtype for ``train.mixed_precision`` on ``device``."""
    dtype = DTYPES[mixed_precision]
    if device.type == "cpu" and dtype == torch.float16:
        return torch.float32  # CPU fp16 kernels are slow or missing; accelerate runs fp32 anyway
    return dtype


def load_pipeline(model_cfg: DictConfig, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """Return the SDXL or SD 1.5 pipeline named by ``model_cfg``, on the CPU, in ``dtype``.

    ``pretrained=tiny``: the tiny test models; ``pretrained=random``: the full-size published
    architecture with random weights (seeded), to try a setup end to end before downloading."""
    check_model_source(model_cfg)
    if model_cfg.pretrained in BUILT_IN_CODE:
        if model_cfg.pretrained == "tiny":
            pipe = build_tiny_pipeline(model_cfg.family)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(TINY_SEED)
                pipe = build_full_pipeline(model_cfg.family, "cpu", torch.float32)
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    cls = PIPELINE_CLASSES[model_cfg.family]
    kwargs = {}
    if model_cfg.vae:
        kwargs["vae"] = AutoencoderKL.from_pretrained(model_cfg.vae, torch_dtype=dtype)
    if model_cfg.family == "sdxl":
        kwargs["add_watermarker"] = False
    else:
        # Training and sampling never need the NSFW classifier; skipping it saves a CLIP vision model.
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return cls.from_pretrained(model_cfg.pretrained, variant=model_cfg.variant, torch_dtype=dtype, **kwargs)


def check_model_source(model_cfg: DictConfig) -> None:
    """Fail fast, before loading anything, if the model can't be found or fetched."""
    if model_cfg.family not in PIPELINE_CLASSES:
        raise ValueError(f"model.family={model_cfg.family!r} is not one of {', '.join(PIPELINE_CLASSES)}")
    if model_cfg.pretrained not in BUILT_IN_CODE:
        check_hub_resource(model_cfg.pretrained, "model", "model.pretrained", "model_index.json")
    if model_cfg.vae:
        check_hub_resource(model_cfg.vae, "model", "model.vae", "config.json")


def sampling_scheduler(pipe: DiffusionPipeline, name: str):
    """A DDPM or DDIM sampler built from the base model's own noise schedule."""
    return SAMPLERS[name].from_config(pipe.scheduler.config)


def training_scheduler(pipe: DiffusionPipeline) -> DDPMScheduler:
    """The model's training noise schedule (betas, prediction type) as a DDPM scheduler."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


# ----------------------------------------------------------------------------------------------
# Tiny models (sizes from ../shared/guides/stack-facts.md and diffusers' own test suite).


def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with no merges: every character is a token. No download."""
    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(c, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _tiny_text_encoder(tokenizer: CLIPTokenizer, projection: bool):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


# Latents x this have about unit variance on the synthetic set (the RGB block means have std ~0.55),
# as the real models' scaling factors give theirs, so the diffusion prior matches the data.
TINY_VAE_SCALING = 1.8
TINY_VAE_CONSTANT = 1000.0  # a constant channel that dominates the GroupNorm statistics
TINY_VAE_SHIFT = 20.0  # SiLU(x + 20) = x + 20 to within 1e-7 for |x| <= 1: its linear range


def _tiny_vae() -> AutoencoderKL:
    """The tiny models' VAE: the real class, 4 levels (the latent is 1/8 of the image side, as in
    the real models), with weights set in closed form so it autoencodes (``_set_average_pool``).

    With random weights it decoded every latent to much the same colour noise, so no image metric
    could see what training learned: a LoRA trained on watercolours and one trained on comics
    sampled indistinguishable images. Its constructor still draws random initial weights from the
    seeded RNG (then overwritten), so the models built after it draw the same numbers as before."""
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=1,  # one group: see _set_average_pool
        sample_size=64,
        scaling_factor=TINY_VAE_SCALING,
    )
    _set_average_pool(vae)
    return vae


@torch.no_grad()
def _set_average_pool(vae: AutoencoderKL) -> None:
    """Make ``vae`` encode an image to its 8x8-block averages (RGB in latent channels 0-2, channel
    3 zero, a posterior std of 3e-7) and decode a latent by repeating each value over its 8x8
    block: decode(encode(x)) is x averaged over 8x8 blocks, to within 1e-3.

    Every residual branch (ResNet blocks, attention) is switched off; the down-samplers average
    2x2 and the up-samplers copy. The only non-linear steps left are the output GroupNorm + SiLU
    of encoder and decoder: a channel held at TINY_VAE_CONSTANT and one at -(sum of the others)
    make that norm's mean and std the same for every image (to ~1e-5), so its affine parameters
    can undo it exactly, and TINY_VAE_SHIFT moves SiLU's input into its linear range."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    def taps(conv: torch.nn.Conv2d, pairs: list[tuple[int, int, float]], bias: torch.Tensor | None = None) -> None:
        """Only the centre taps (out, in) = value; the bias as given (else zero)."""
        weight, k = torch.zeros_like(conv.weight), conv.weight.shape[-1] // 2
        for out, inp, value in pairs:
            weight[out, inp, k, k] = value
        conv.weight.copy_(weight)
        conv.bias.copy_(bias if bias is not None else torch.zeros_like(conv.bias))

    for module in vae.modules():
        if isinstance(module, ResnetBlock2D):
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
        elif isinstance(module, Attention):
            module.to_out[0].weight.zero_()
            module.to_out[0].bias.zero_()
        elif isinstance(module, Downsample2D):
            weight = torch.zeros_like(module.conv.weight)
            for c in range(weight.shape[0]):
                weight[c, c, :2, :2] = 0.25
            module.conv.weight.copy_(weight)
            module.conv.bias.zero_()
        elif isinstance(module, Upsample2D):
            taps(module.conv, [(c, c, 1.0) for c in range(module.conv.weight.shape[0])])
    n, const, shift = 32, TINY_VAE_CONSTANT, TINY_VAE_SHIFT
    constant = torch.zeros(n)
    constant[n - 1] = const
    minus_sum = [(n - 2, c, -1.0) for c in range(3)]
    taps(vae.encoder.conv_in, [(c, c, 1.0) for c in range(3)] + minus_sum, constant)
    taps(vae.decoder.conv_in, [(c, c, 1.0) for c in range(4)] + minus_sum + [(n - 2, 3, -1.0)], constant)
    sigma = (const**2 * (n - 1) / n**2) ** 0.5  # the single group's std, whatever the image
    for norm in (vae.encoder.conv_norm_out, vae.decoder.conv_norm_out):
        norm.weight.fill_(sigma)
        norm.bias.fill_(const / n + shift)
    moments = torch.zeros(8)
    moments[:3], moments[4:] = -shift, -30.0  # means: RGB; log-variances: -30
    taps(vae.encoder.conv_out, [(c, c, 1.0) for c in range(3)], moments)
    taps(vae.quant_conv, [(c, c, 1.0) for c in range(8)])
    taps(vae.post_quant_conv, [(c, c, 1.0) for c in range(4)])
    taps(vae.decoder.conv_out, [(c, c, 1.0) for c in range(3)], torch.full((3,), -shift))


# The noise schedule both SD 1.5 and SDXL were trained with (their schedulers' betas).
NOISE_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
)


def build_tiny_pipeline(family: str) -> DiffusionPipeline:
    """A randomly initialised SDXL or SD 1.5 pipeline of the real classes, seeded by TINY_SEED."""
    pipe = _tiny_pipeline(family)
    for component in pipe.components.values():  # eval mode, as from_pretrained leaves models
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _tiny_pipeline(family: str) -> DiffusionPipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        tokenizer = tiny_tokenizer()
        unet_kwargs = dict(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            # 4+ channels a group, as the real UNets have 10: with one channel a group, GroupNorm
            # removes every channel's spatial mean, and the tiny UNet could not learn an image's colour.
            norm_num_groups=8,
        )
        if family == "sd15":
            unet = UNet2DConditionModel(cross_attention_dim=32, **unet_kwargs)
            return StableDiffusionPipeline(
                vae=_tiny_vae(),
                text_encoder=_tiny_text_encoder(tokenizer, projection=False),
                tokenizer=tokenizer,
                unet=unet,
                scheduler=PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **NOISE_SCHEDULE),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        if family != "sdxl":
            raise ValueError(f"model.family={family!r} is not one of 'sdxl', 'sd15'")
        time_dim, pooled_dim = 8, 32
        unet = UNet2DConditionModel(
            cross_attention_dim=64,  # hidden(te1) + hidden(te2), concatenated as in SDXL
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # 6 size/crop numbers, each embedded to time_dim, plus te2's pooled projection
            projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            **unet_kwargs,
        )
        return StableDiffusionXLPipeline(
            vae=_tiny_vae(),
            text_encoder=_tiny_text_encoder(tokenizer, projection=False),
            text_encoder_2=_tiny_text_encoder(tokenizer, projection=True),
            tokenizer=tokenizer,
            tokenizer_2=tiny_tokenizer(),
            unet=unet,
            scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **NOISE_SCHEDULE),
            add_watermarker=False,
        )


# ----------------------------------------------------------------------------------------------
# Full-size architectures, from the published configs (model_index.json and each component's
# config.json) of stabilityai/stable-diffusion-xl-base-1.0 and stable-diffusion-v1-5/stable-diffusion-v1-5.
# Keys left out equal diffusers' / transformers' defaults. Parameter counts (checked in the tests):
# SDXL UNet 2,567,463,684; SD 1.5 UNet 859,520,964; VAE 83,653,863; CLIP ViT-L text 123,060,480;
# OpenCLIP bigG text + projection 694,659,840.

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sdxl": dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20),  # the number of heads, in diffusers' historical naming
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP bigG), concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 size/crop numbers x 256 + 1280 pooled
        norm_num_groups=32,
        norm_eps=1e-5,
    ),
    "sd15": dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=32,
        norm_eps=1e-5,
    ),
}

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
)
VAE_FAMILY = {
    "sdxl": dict(sample_size=1024, scaling_factor=0.13025),
    "sd15": dict(sample_size=512, scaling_factor=0.18215),
}

# SD 1.5's only text encoder and SDXL's first: OpenAI CLIP ViT-L/14's text tower.
CLIP_VIT_L: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    layer_norm_eps=1e-5,
)
# SDXL's second: OpenCLIP ViT-bigG/14's text tower with its projection (pooled output).
OPENCLIP_BIGG: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
    layer_norm_eps=1e-5,
)


def build_full_components(family: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict:
    """The full-size UNet, VAE and text encoder(s) of ``family`` with random weights, built on
    ``device`` (no slow CPU init of 2.6B parameters on a GPU box; ``"meta"`` for shapes only) and
    cast to ``dtype`` one component at a time, so at most one of them is ever in fp32 there."""
    tokenizer = tiny_tokenizer()
    # The real tokenizers' special ids are 49406/49407; the byte-level test tokenizer's are small.
    # Only the token ids' length (77) and range (< vocab) matter for the compute.
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    components = {}
    with torch.device(device):
        components["unet"] = _place(UNet2DConditionModel(**UNET_CONFIGS[family]), device, dtype)
        components["vae"] = _place(AutoencoderKL(**VAE_CONFIG, **VAE_FAMILY[family]), device, dtype)
        components["text_encoder"] = _place(CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L, **ids)), device, dtype)
        if family == "sdxl":
            encoder = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG, **ids))
            components["text_encoder_2"] = _place(encoder, device, dtype)
    components["tokenizer"] = tokenizer
    return components


def _place(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    module.to(device)  # a no-op where the device context already put it there
    return module if dtype == torch.float32 else module.to(dtype)


def build_full_pipeline(family: str, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    """A real StableDiffusionXLPipeline / StableDiffusionPipeline (the classes training uses) of
    full-size random components, on ``device`` in ``dtype``, every component in eval mode."""
    parts = build_full_components(family, device, dtype)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            **parts,
            tokenizer_2=tiny_tokenizer(),
            scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **NOISE_SCHEDULE),
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            **parts,
            scheduler=PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **NOISE_SCHEDULE),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe
