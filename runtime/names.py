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
