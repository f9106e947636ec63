"""File formats, one owner each: Lightning checkpoints (:mod:`.checkpoints`), the LayerDiffuse
transparent VAE files (:mod:`.layerdiffuse_vae`), LoRA keys in every layout (:mod:`.lora`, with
the original UNet's names in :mod:`.unet_names`), full-weight UNet offsets in the ``::diff::``
layout of the conditional SDXL files (:mod:`.unet_delta`), diffusers UNet folders (:mod:`.unet`), the
provenance in an export's safetensors metadata (:mod:`.provenance`), the joint-layer units' weights
(:mod:`.layer_sharing`; with a condition layer, :mod:`.layer_conditional`; out of a training
checkpoint, :mod:`.layer_checkpoints`), the DiffuMatting matting head (:mod:`.matting_head`), alpha
mattes (:mod:`.matte`) and the layered image files of joint generation, PSD and OpenRaster
(:mod:`.layered_image`).

They sit above ``layerdiff.models`` and below the pipelines, the training modules and the
``python -m layerdiff.export`` CLI, and import none of those.
"""
