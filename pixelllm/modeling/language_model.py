"""Language model: Hugging Face `T5ForConditionalGeneration`, optionally LoRA-adapted with `peft`.

Visual tokens are concatenated before the embedded text prompt as the encoder's input embeddings.
"""

from __future__ import annotations

import warnings

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from torch.ao.quantization import quantize_dynamic
from transformers import T5Config, T5ForConditionalGeneration
from transformers.cache_utils import Cache

from ..config import LanguageModelConfig


def inject_lora(t5: T5ForConditionalGeneration, cfg: LanguageModelConfig) -> None:
    """Freeze `t5` and add LoRA adapters (in place) to the modules named in `cfg.lora.target_modules`."""
    t5.requires_grad_(False)
    lora = peft.LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        bias="none",
    )
    peft.inject_adapter_in_model(lora, t5)


class LanguageModel(nn.Module):
    """T5 with visual-token inputs. Hidden states are (B, T, D) with D = `d_model`."""

    def __init__(self, cfg: LanguageModelConfig, t5: T5ForConditionalGeneration | None = None):
        super().__init__()
        self.cfg = cfg
        self.t5 = t5 if t5 is not None else T5ForConditionalGeneration(T5Config(**cfg.t5))
        self.t5.config.use_cache = True
        if cfg.mode == "lora":
            inject_lora(self.t5, cfg)
        elif cfg.mode == "frozen":
            self.t5.requires_grad_(False)
        elif cfg.mode != "full":
            raise ValueError(f"language_model.mode must be 'lora', 'full' or 'frozen', got {cfg.mode!r}")

    def _apply(self, fn, recurse=True):
        """Casts to float16 leave the modules T5 names in `_keep_in_fp32_modules` (its feed-forward outputs `wo`)
        float32, as `T5ForConditionalGeneration.from_pretrained(dtype=torch.float16)` does: Flan-T5-XL's activations
        there overflow float16. T5 casts their inputs up and the next layer norm back down."""
        keep = tuple(getattr(self.t5, "_keep_in_fp32_modules", None) or ())
        kept_params = [p for name, p in self.t5.named_parameters() if any(k in name.split(".") for k in keep)]
        kept = {id(p) for p in kept_params} | {id(p.grad) for p in kept_params if p.grad is not None}

        def no_float16(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in kept and t.dtype == torch.float32 and out.dtype == torch.float16:
                return t.to(out.device)
            return out

        return super()._apply(no_float16, recurse)

    @property
    def dim(self) -> int:
        return self.t5.config.d_model

    @property
    def vocab_size(self) -> int:
        return self.t5.config.vocab_size

    def encode(
        self,
        visual_tokens: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        visual_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual tokens (B, Q, D) (where `visual_mask` (B, Q), default all) + prompt ids (B, P) -> encoder states
        (B, Q+P, D) and their mask (B, Q+P)."""
        text = self.t5.get_input_embeddings()(prompt_ids)
        embeds = torch.cat([visual_tokens.to(text.dtype), text], dim=1)
        if visual_mask is None:
            visual_mask = torch.ones(visual_tokens.shape[:2], device=prompt_mask.device)
        mask = torch.cat([visual_mask.to(prompt_mask.dtype), prompt_mask], dim=1)
        states = self.t5.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return states, mask

    def decode(
        self,
        input_ids: torch.Tensor,
        encoder_states: torch.Tensor,
        encoder_mask: torch.Tensor,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, Cache | None]:
        """Decoder input ids (B, T) -> final decoder states (B, T, D) and the updated KV cache."""
        out = self.t5.decoder(
            input_ids=input_ids,
            encoder_hidden_states=encoder_states,
            encoder_attention_mask=encoder_mask,
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state, out.cache

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder states (B, T, D) -> vocabulary logits (B, T, V), as `T5ForConditionalGeneration` does."""
        if getattr(self.t5.config, "scale_decoder_outputs", False):
            hidden = hidden * (self.t5.model_dim**-0.5)
        return self.t5.lm_head(hidden)

    @property
    def quantized(self) -> bool:
        """Has `quantize_int8` run (inference only from then on)?"""
        return any(isinstance(m, DynamicQuantizedLinear) for m in self.t5.modules())

    def quantize_int8(self) -> None:
        """Inference on CPU only: LoRA folded in and removed, then every linear layer of T5 (the vocabulary head too)
        stored in int8 with activations quantized on the fly (`torch.ao` dynamic quantization). Decoding reads a
        quarter of the weight bytes per token; scores and occasionally tokens differ slightly from float32."""
        if self.t5.device.type != "cpu" or self.t5.dtype != torch.float32:
            raise ValueError(
                f"int8 quantization needs a float32 model on the CPU, this one is {self.t5.dtype} on "
                f"{self.t5.device}: quantize the float32 model on the CPU (on a GPU, use bfloat16 instead of int8)"
            )
        if self.quantized:
            return
        self.set_lora_merged(True)
        for name, module in list(self.t5.named_modules()):
            if isinstance(module, LoraLayer):
                parent, _, child = name.rpartition(".")
                setattr(self.t5.get_submodule(parent), child, module.get_base_layer())
        with warnings.catch_warnings():  # torch.ao quantization is deprecated (torchao replaces it); 2.x still runs it
            warnings.filterwarnings("ignore", message=".*deprecated", category=UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            quantize_dynamic(self.t5, {nn.Linear}, dtype=torch.qint8, inplace=True)
        self.t5.requires_grad_(False)

    def set_lora_merged(self, merged: bool) -> None:
        """Fold LoRA weights into the base weights (faster inference) or take them back out."""
        if not merged and self.quantized:
            raise RuntimeError(
                "the language model is int8-quantized: LoRA weights, where it had any, are folded in for good"
            )
        for module in self.t5.modules():
            if isinstance(module, LoraLayer):
                if merged and not module.merged:
                    module.merge()
                elif not merged and module.merged:
                    module.unmerge()
