"""Graph roles and the tensor names each role exposes: the naming half of the bundle contract.

The exporter writes graphs with exactly these input and output names and records them, with
shapes and dtypes, in the manifest; the runtime addresses tensors by these names.
"""

TEXT_ENCODER, UNET, VAE_DECODER = "text_encoder", "unet", "vae_decoder"

INPUT_IDS = "input_ids"  # text encoder in: (1, L) token ids
HIDDEN_STATES = "last_hidden_state"  # text encoder out: (1, L, D)

SAMPLE = "sample"  # UNet in: (B, C, h, w) scaled latents
TIMESTEP = "timestep"  # UNet in: (B,) float32
CONTEXT = "encoder_hidden_states"  # UNet in: (B, L, D)
NOISE_PRED = "noise_pred"  # UNet out: (B, C, h, w)

LATENTS = "latents"  # VAE decoder in: (1, C, h, w) unscaled latents
IMAGE = "image"  # VAE decoder out: (1, 3, H, W) in [-1, 1]

DEEP_FEATURE = "deep_feature"  # DeepCache feature: output of a deep-write graph, input of a shallow one
XATTN_PREFIX = "xattn/"  # cross-attention maps: "xattn/<attn2 module path>", outputs of write, inputs of read


def xattn_tensor_name(module_name: str) -> str:
    """Graph tensor name of one cross-attention cache, e.g. ``xattn/mid_block.attentions.0....attn2``: the
    output of a ``xattn="write"`` graph and the input of a ``xattn="read"`` one, handed over unchanged."""
    return XATTN_PREFIX + module_name


def unet_graph_name(latent: tuple[int, int], batch: int, deep: str, branch: int, xattn: str) -> str:
    """File stem of a UNet variant graph, e.g. ``unet-64x64-b2-full`` or ``unet-32x32-b1-shallow1-xread``."""
    deep_part = {"none": "full", "write": f"deep{branch}", "read": f"shallow{branch}"}[deep]
    xattn_part = {"none": "", "write": "-xwrite", "read": "-xread"}[xattn]
    return f"unet-{latent[0]}x{latent[1]}-b{batch}-{deep_part}{xattn_part}"
