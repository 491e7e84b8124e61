"""Graph roles and the tensor names each role exposes: the naming half of the bundle contract.

The exporter writes graphs with exactly these input and output names and records them, with
shapes and dtypes, in the manifest; the runtime addresses tensors by these names.
"""

TEXT_ENCODER, UNET, VAE_DECODER = "text_encoder", "unet", "vae_decoder"
# SDXL's second text encoder (CLIPTextModelWithProjection): graph name and role.
TEXT_ENCODER_2 = "text_encoder_2"
TEXT_ENCODERS = (TEXT_ENCODER, TEXT_ENCODER_2)  # roles the exporter keeps in fp32

INPUT_IDS = "input_ids"  # text encoder in: (1, L) token ids
# Text encoder out: (1, L, D), the states the UNet cross-attends to (SD: CLIP's last hidden state;
# SDXL: each encoder's penultimate hidden state, concatenated by the runtime along D).
HIDDEN_STATES = "last_hidden_state"

# PixArt-alpha's T5: the prompt's attention mask (1, L) int64, 1 = token, 0 = padding; the text encoder
# takes it as ``attention_mask``, the transformer as ``encoder_attention_mask`` (its cross-attention bias).
ATTENTION_MASK = "attention_mask"
ENCODER_MASK = "encoder_attention_mask"

SAMPLE = "sample"  # UNet in: (B, C, h, w) scaled latents
TIMESTEP = "timestep"  # UNet in: (B,) float32
CONTEXT = "encoder_hidden_states"  # UNet in: (B, L, D)
TIMESTEP_COND = "timestep_cond"  # UNet in: (B, D') guidance-scale embedding, models distilled with one (LCM)
NOISE_PRED = "noise_pred"  # UNet out: (B, C, h, w)
# SDXL's added conditioning (diffusers' ``added_cond_kwargs`` keys, addition_embed_type "text_time"):
TEXT_EMBEDS = "text_embeds"  # text_encoder_2 out (1, P) pooled + projected; UNet in (B, P)
TIME_IDS = "time_ids"  # UNet in: (B, 6) float32: original size (h, w), crop top-left (y, x), target size (h, w)

LATENTS = "latents"  # VAE decoder in: (1, C, h, w) unscaled latents
IMAGE = "image"  # VAE decoder out: (1, 3, H, W) in [-1, 1]

# Cache roles: the one vocabulary for both caches, in schedules, manifests, graph names and docs.
# A "write" graph computes a cache and emits it; a "read" graph takes it instead of computing it.
# DeepCache: write = the full UNet, also emitting the feature that enters the branch's up layer;
# read = only the shallow layers, fed that feature. Cross-attention: write = every attn2 output is
# emitted; read = every attn2 module returns its input tensor instead.
NONE, WRITE, READ = "none", "write", "read"
CACHE_ROLES = (NONE, WRITE, READ)

DEEP_FEATURE = "deep_feature"  # DeepCache feature: output of a deep write graph, input of a deep read one
XATTN_PREFIX = "xattn/"  # cross-attention maps: "xattn/<attn2 module path>", outputs of write, inputs of read


def is_cache(tensor: str) -> bool:
    """Whether a graph output is a cache tensor (the DeepCache feature, a cross-attention map), as
    a per-variant graph names it or as the merged graph does (``out/`` + that name): the outputs a
    later step takes as inputs, which device runners keep in device memory."""
    name = tensor[len("out/"):] if tensor.startswith("out/") else tensor
    return name == DEEP_FEATURE or name.startswith(XATTN_PREFIX)


def xattn_tensor_name(module_name: str) -> str:
    """Graph tensor name of one cross-attention cache, e.g. ``xattn/mid_block.attentions.0....attn2``: the
    output of a ``xattn="write"`` graph and the input of a ``xattn="read"`` one, handed over unchanged."""
    return XATTN_PREFIX + module_name


def unet_graph_name(latent: tuple[int, int], batch: int, deep: str, branch: int, xattn: str) -> str:
    """File stem of a UNet variant graph, e.g. ``unet-64x64-b2`` (plain), ``unet-64x64-b2-deep1-write`` or
    ``unet-32x32-b1-deep1-read-xattn-read``."""
    deep_part = "" if deep == NONE else f"-deep{branch}-{deep}"
    xattn_part = "" if xattn == NONE else f"-xattn-{xattn}"
    return f"unet-{latent[0]}x{latent[1]}-b{batch}{deep_part}{xattn_part}"


def free_axes(tensor: str) -> dict[int, str]:
    """How a UNet tensor's axes follow the variant, for the merged UNet's free sides: axis -> ``"batch"``,
    ``"height"``/``"width"`` (latent-shaped tensors: sample, noise_pred, the DeepCache feature; its
    side scales with the latent's) or ``"tokens"`` (cross-attention maps: one per latent cell at the
    module's scale, so it scales with the latent's area). Every other axis is fixed."""
    if tensor in (SAMPLE, NOISE_PRED, DEEP_FEATURE):
        return {0: "batch", 2: "height", 3: "width"}
    if tensor.startswith(XATTN_PREFIX):
        return {0: "batch", 1: "tokens"}
    return {0: "batch"}  # timestep, encoder_hidden_states
