"""Tiny random models for ``data.filters`` and ``data.captions``, built offline in ``save_pretrained``
layouts: a CLIP model with its processor, an aesthetic head file in the LAION predictor's layout,
and a LLaVA-class image-text-to-text model with its processor."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
    GPT2Tokenizer,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from layerdiff.models.tiny import BOS_TOKEN, EOS_TOKEN, byte_level_vocab, make_tokenizer

IMAGE_SIDE, PATCH = 16, 8
CLIP_WIDTH = 8
# A chat template in LLaVA's spirit: the image token where the image goes, then the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _image_processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE})


def _vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            image_size=IMAGE_SIDE, patch_size=PATCH, projection_dim=CLIP_WIDTH)


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random ``CLIPModel`` (projection width ``CLIP_WIDTH``) and its processor in ``folder``."""
    tokenizer = make_tokenizer(folder / "vocabulary", EOS_TOKEN)
    vocab = byte_level_vocab()
    text = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab[BOS_TOKEN],
                          eos_token_id=vocab[EOS_TOKEN], pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=_vision_config().to_dict(),
                                 projection_dim=CLIP_WIDTH))
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=_image_processor(), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def aesthetic_head(width: int = CLIP_WIDTH, seed: int = 0) -> torch.nn.Sequential:
    """The LAION predictor's layer layout (Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear,
    Linear) at tiny widths, with random weights."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(width, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 8), torch.nn.Dropout(0.2),
        torch.nn.Linear(8, 4), torch.nn.Dropout(0.1), torch.nn.Linear(4, 2), torch.nn.Linear(2, 1),
    ).eval()


def save_aesthetic_head(path: Path, head: torch.nn.Sequential) -> Path:
    """Save as the LAION predictor's ``.pth`` is saved: its module's state dict, names under ``layers.``."""
    torch.save({f"layers.{name}": tensor for name, tensor in head.state_dict().items()}, path)
    return path


def build_tiny_llava(folder: Path, *, chat_template: bool = True, seed: int = 0) -> Path:
    """A random ``LlavaForConditionalGeneration`` (CLIP vision tower, Llama text model) with its
    ``LlavaProcessor`` in ``folder``; the tokenizer is byte-level BPE without merges (one token per byte)."""
    symbols = list(bytes_to_unicode().values()) + ["<s>", "</s>", "<unk>", "<pad>", "<image>"]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[], bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(image_processor=_image_processor(), tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE if chat_template else None)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                       bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"])
    config = LlavaConfig(vision_config=_vision_config().to_dict(), text_config=text.to_dict(),
                         image_token_id=vocab["<image>"], vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if not chat_template:  # some versions write an empty template file anyway
        for name in ("chat_template.jinja", "chat_template.json"):
            (folder / name).unlink(missing_ok=True)
        config_path = folder / "processor_config.json"
        config_json = json.loads(config_path.read_text())
        config_json.pop("chat_template", None)
        config_path.write_text(json.dumps(config_json))
    return folder
