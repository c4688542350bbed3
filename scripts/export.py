"""Exports a training checkpoint for PyTorch users (see configs/export.py for the formats).

    python scripts/export.py --config configs/export.py:FORMAT --workdir OUT --config.checkpoint=RUN

Loading the results in diffusers:
    pipe.load_lora_weights("OUT/lora.safetensors")                     # peft or kohya
    StableDiffusionPipeline.from_pretrained("OUT")                     # unet: the whole pipeline
    UNet2DConditionModel.from_pretrained("OUT/unet")                   # unet with unet_only=True
    pipe.load_ip_adapter("OUT", subfolder="", weight_name="psa_adapter.safetensors",
                         image_encoder_folder=None)                    # ip-adapter
    PSAAdapter(pipe, psa_adapter_ckpt="OUT/psa_adapter.safetensors", ...)   # psalign (PSAlign's code)
The adapter scale lambda is in both adapter files' metadata ("psa_scale").
    pipe.load_lora_weights("OUT", weight_name=f"{c}.safetensors", adapter_name=c)   # gated, per
    pipe.set_adapters(cats, adapter_weights=gates)     # category c (README "User-gated PSA")

The command is safealign_jax/commands/export.py (installed as `safealign-export`); `main(config, workdir)`
is its work, as in every script.
"""

from safealign_jax.commands import export as command

main = command.run

if __name__ == "__main__":
    command.main()
