"""PixelLLM: the whole model. Images + optional box/point + text prompt -> tokens, each with a location."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5ForConditionalGeneration

from ..config import MAX_PROPOSALS, PROPOSAL_NMS_IOU, PROPOSAL_SCORE_THRESHOLD, PixelLLMConfig, ProposalHeadConfig
from ..tokenizer import EOS_ID, PAD_ID, Tokenizer
from .feature_extractor import ImageReading, PromptFeatureExtractor
from .frozen_block import FrozenLMBlock
from .generation import Generated, ShouldStop, beam_search_n_best, check_length, greedy, iter_greedy
from .image_encoder import ImageEncoder
from .language_model import LanguageModel
from .mask_head import MaskHead, upsample_masks
from .point_head import PointHead
from .prompt_encoder import LocationPromptEncoder, _where
from .proposal_head import ProposalHead

IGNORE_INDEX = -100


@dataclass
class ImageFeatures:
    """Encoder outputs for a batch: fused features (B, C, h, w) and SAM features (B, C_sam, h', w'); and, for
    features kept to answer many prompts (`encode_images(keep=True)`), the objects of the object tokens, boxes
    (B, K, 4) and valid (B, K) as `PixelLLM.object_proposals` gives them, what the prompt feature extractor
    reads of the images before any prompt (`ImageReading`), and each image's object proposals as
    `PixelLLM.propose` finds them with its default arguments."""

    fused: torch.Tensor
    sam: torch.Tensor
    objects: tuple[torch.Tensor, torch.Tensor] | None = None
    reading: ImageReading | None = None
    proposals: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __getitem__(self, index: slice | torch.Tensor | list[int]) -> ImageFeatures:
        objects = None if self.objects is None else (self.objects[0][index], self.objects[1][index])
        reading = None if self.reading is None else self.reading[index]
        proposals = None
        if self.proposals is not None:
            rows = index.cpu() if isinstance(index, torch.Tensor) else index  # the proposals are a list: any device
            proposals = [self.proposals[i] for i in torch.arange(len(self.proposals))[rows].tolist()]
        return ImageFeatures(self.fused[index], self.sam[index], objects, reading, proposals)

    def clone(self) -> ImageFeatures:
        """A copy with memory of its own: indexing a batch gives views that keep the whole batch's memory."""
        objects = None if self.objects is None else (self.objects[0].clone(), self.objects[1].clone())
        reading = None if self.reading is None else self.reading.clone()
        proposals = None if self.proposals is None else [(b.clone(), s.clone()) for b, s in self.proposals]
        return ImageFeatures(self.fused.clone(), self.sam.clone(), objects, reading, proposals)

    @staticmethod
    def cat(items: list[ImageFeatures]) -> ImageFeatures:
        """One batch of the items' images; with objects and readings where every item has them."""
        found = [f.objects for f in items]
        objects = None if any(f is None for f in found) else tuple(torch.cat(t) for t in zip(*found))
        readings = [f.reading for f in items]
        reading = None if any(r is None for r in readings) else ImageReading.cat(readings)  # type: ignore[arg-type]
        proposals = None if any(f.proposals is None for f in items) else [p for f in items for p in f.proposals]  # type: ignore[union-attr]
        fused, sam = torch.cat([f.fused for f in items]), torch.cat([f.sam for f in items])
        return ImageFeatures(fused, sam, objects, reading, proposals)  # type: ignore[arg-type]

    @property
    def nbytes(self) -> int:
        tensors = (self.fused, self.sam, *(self.objects or ()), *(t for p in self.proposals or () for t in p))
        return sum(t.numel() * t.element_size() for t in tensors) + (self.reading.nbytes if self.reading else 0)


@dataclass
class Prompts:
    """Per-sample prompts of a batch. Boxes (B, 4) and points (B, 2) are in model-input pixels.

    `image_index` (B,) names the image (a row of the features) each prompt reads, so many prompts can share
    one image's features; default: prompt i reads image i.
    """

    texts: list[str]
    boxes: torch.Tensor | None = None
    box_mask: torch.Tensor | None = None
    points: torch.Tensor | None = None
    point_mask: torch.Tensor | None = None
    image_index: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> Prompts:
        """The prompts at rows (R,), reading the same images as before."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        image_index = rows if self.image_index is None else self.image_index[rows]
        texts = [self.texts[i] for i in rows.tolist()]
        return Prompts(
            texts, pick(self.boxes), pick(self.box_mask), pick(self.points), pick(self.point_mask), image_index
        )


class PixelLLM(nn.Module):
    def __init__(
        self,
        cfg: PixelLLMConfig,
        tokenizer: Tokenizer | None = None,
        t5: T5ForConditionalGeneration | None = None,
        load_frozen_block: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.sources: dict[str, str] = {}
        self.image_encoder = ImageEncoder(cfg.sam, cfg.eva, cfg.image_size)
        fused_dim = self.image_encoder.out_dim
        self.frozen_block = (
            FrozenLMBlock(cfg.frozen_block, fused_dim, load_weights=load_frozen_block)
            if cfg.frozen_block is not None
            else None
        )
        self.prompt_encoder = LocationPromptEncoder(cfg.sam.out_chans, self.image_encoder.sam_grid, cfg.image_size)
        self.language_model = LanguageModel(cfg.language_model, t5)
        if tokenizer is not None and tokenizer.vocab_size > self.language_model.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the language model only "
                f"{self.language_model.vocab_size} embeddings: give the tokenizer the model was trained with (Flan-T5's "
                "for T5 checkpoints)"
            )
        lm_dim = self.language_model.dim
        self.extractor = PromptFeatureExtractor(cfg.extractor, fused_dim, cfg.sam.out_chans, lm_dim, cfg.image_size)
        self.point_head = PointHead(cfg.point_head, lm_dim)
        self.mask_head = MaskHead(cfg.mask_decoder, cfg.sam.out_chans)
        self.proposal_head = ProposalHead(cfg.proposal_head, fused_dim) if cfg.proposal_head is not None else None
        self.image_encoder.sam.requires_grad_(cfg.sam.trainable)
        self.prompt_encoder.sam.requires_grad_(cfg.sam.trainable)
        self.image_encoder.eva.requires_grad_(cfg.eva.trainable)
        self.mask_head.requires_grad_(cfg.mask_decoder.trainable)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.extractor.queries.dtype

    # ----------------------------------------------------------------- encoders
    def encode_images(self, images: torch.Tensor, keep: bool = False) -> ImageFeatures:
        """Images (B, 3, S, S) in [0, 1] (see `pixelllm.transforms`) -> `ImageFeatures`.

        `keep`: the features are kept to answer many prompts, so do once per image what every prompt would do
        again: find the object proposals (models with a proposal head) and the objects of the object tokens
        (models with them), and read the image for the extractor.
        """
        fused, sam = self.image_encoder(images.to(self.device, self.dtype))
        if self.frozen_block is not None:
            b, c, h, w = fused.shape
            tokens = self.frozen_block(fused.flatten(2).transpose(1, 2))
            fused = tokens.transpose(1, 2).reshape(b, c, h, w)
        features = ImageFeatures(fused, sam)
        if keep:
            objects = {}
            if self.proposal_head is not None:
                features.proposals = self.propose(features)
            if self.cfg.extractor.object_tokens:
                features.objects = self.object_proposals(features)
                objects = self._object_boxes(*features.objects)
            features.reading = self.extractor.read(fused, self.prompt_encoder.pe_layer, **objects)
            features.reading.unlocated = self._extract(features, Prompts(texts=[""] * len(fused)))
        return features

    def tokenize_prompts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt texts -> ids (B, P) and mask (B, P), truncated to `max_prompt_tokens` (EOS kept)."""
        tok = self._require_tokenizer()
        limit = self.cfg.language_model.max_prompt_tokens
        seqs = [tok.encode(t, add_eos=False)[: limit - 1] + [EOS_ID] for t in texts]
        return _pad(seqs, PAD_ID, self.device)

    def visual_tokens(self, features: ImageFeatures, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """The location prompts read the image: visual tokens (B, V, D) and their mask (B, V).

        V is Q, Q + 1 with anchored queries (the layout token), Q + 1 + K with K object tokens; the mask is
        False on object tokens an image has no proposal for, and on all of them for a prompt with a box or point
        (a region caption reads its own region). Prompts without a box or point on kept features
        (`encode_images(keep=True)`) take the image's `ImageReading.unlocated` tokens: the same for all of them.
        """
        b = len(prompts.texts)
        located = _located(prompts, b, self.device)
        image_index = torch.arange(b, device=self.device) if prompts.image_index is None else prompts.image_index
        valid = None
        if self.cfg.extractor.object_tokens:
            if features.objects is None:
                needed = torch.zeros(len(features.fused), dtype=torch.bool, device=self.device)
                needed[image_index[~located]] = True
                features = replace(features, objects=self.object_proposals(features, needed))
            valid = features.objects[1]
        unlocated = None if features.reading is None else features.reading.unlocated
        if unlocated is None:
            visual = self._extract(features, prompts)
        else:
            visual = unlocated[image_index]
            rows = located.nonzero()[:, 0]
            if len(rows):
                visual[rows] = self._extract(features, prompts.select(rows))
        mask = torch.ones(visual.shape[:2], dtype=torch.bool, device=visual.device)
        if valid is not None:
            mask[:, -valid.shape[1] :] = valid[image_index] & ~located[:, None]
        return visual, mask

    def _extract(self, features: ImageFeatures, prompts: Prompts) -> torch.Tensor:
        """The prompt feature extractor on `prompts` -> visual tokens (B, V, D); the objects of the object tokens
        are `features.objects` (models with them)."""
        b = len(prompts.texts)
        masks = dict(box_mask=prompts.box_mask, point_mask=prompts.point_mask, batch_size=b)
        anchors = None
        if self.cfg.extractor.anchor_grid:
            anchors = self.prompt_encoder.anchor_boxes(
                self.cfg.extractor.point_anchor_size, boxes=prompts.boxes, points=prompts.points, **masks
            )
        tokens = self.prompt_encoder(boxes=_float(prompts.boxes), points=_float(prompts.points), **masks)
        image: torch.Tensor | ImageReading = features.fused if features.reading is None else features.reading
        objects = {}
        if features.objects is not None and features.reading is None:  # a reading has its object tokens already
            objects = self._object_boxes(*features.objects)
        return self.extractor(image, tokens, self.prompt_encoder.pe_layer, anchors, prompts.image_index, **objects)

    def _object_boxes(self, boxes: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """The extractor's object arguments for object boxes (U, K, 4) and valid (U, K): the boxes, their box
        tokens and which are objects."""
        box_tokens = self.prompt_encoder(boxes=boxes.flatten(0, 1).float())
        tokens = box_tokens.unflatten(0, boxes.shape[:2])
        return dict(object_boxes=boxes, object_box_tokens=tokens, object_valid=valid)

    def object_proposals(
        self, features: ImageFeatures, needed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The objects the object tokens describe: boxes (U, K, 4) in model-input pixels, best first, padded
        with the whole image, and valid (U, K); K = `extractor.object_tokens`. Not differentiated.

        Only images where `needed` (U,) is True (default: all) are searched; the others (their prompts all read
        a region of their own, which masks the object tokens) get none.
        """
        k, size, u = self.cfg.extractor.object_tokens, self.cfg.image_size, len(features.fused)
        boxes = torch.tensor([0.0, 0.0, size, size], device=self.device).repeat(u, k, 1)
        valid = torch.zeros(u, k, dtype=torch.bool, device=self.device)
        index = list(range(u)) if needed is None else needed.nonzero()[:, 0].tolist()
        if index:
            searched = features if len(index) == u else features[index]
            for i, (b, _) in zip(index, self.propose(searched, max_proposals=k)):
                boxes[i, : len(b)] = b.float()
                valid[i, : len(b)] = True
        return boxes, valid

    def encode_prompts(self, features: ImageFeatures, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """-> T5 encoder states (B, V+P, D) and mask (B, V+P)."""
        visual, visual_mask = self.visual_tokens(features, prompts)
        ids, mask = self.tokenize_prompts(prompts.texts)
        return self.language_model.encode(visual, ids, mask, visual_mask)

    # ----------------------------------------------------------------- training
    def forward(self, batch: dict[str, torch.Tensor | list[str]]) -> dict[str, torch.Tensor]:
        """Losses for a training batch (see `pixelllm.data.collate`).

        Keys: images (B, 3, S, S); prompts (list of B str); boxes (B, 4), box_mask (B,), points (B, 2),
        point_mask (B,) in model-input pixels; labels (B, T) with IGNORE_INDEX padding; target_corners
        (B, T, 2, 2) in [0, 1]; located (B, T) bool; optional mask_boxes (B, 4), mask_targets (B, S, S),
        mask_valid (B,); optional object_boxes (list of B (N_i, 4) in [0, 1]) and objects_valid (B,) for the
        proposal head.

        Losses: token cross-entropy; L1 of the located tokens' corners (in input pixels); the confidence's BCE
        against `located`, over the texts that locate at least one token; mask and proposal losses where given.
        """
        lc = self.cfg.loss
        features = self.encode_images(batch["images"])
        prompts = Prompts(
            texts=batch["prompts"],
            boxes=batch.get("boxes"),
            box_mask=batch.get("box_mask"),
            points=batch.get("points"),
            point_mask=batch.get("point_mask"),
        )
        enc, enc_mask = self.encode_prompts(features, prompts)
        labels = batch["labels"]
        dec_in = _shift_right(labels)
        hidden, _ = self.language_model.decode(dec_in, enc, enc_mask)
        logits = self.language_model.logits(hidden)
        ce = F.cross_entropy(
            logits.float().flatten(0, 1),
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            label_smoothing=lc.label_smoothing,
        )
        corners, confidence = self.point_head(hidden)  # float32, autocast or not: bf16 corners would be off by 2**-9
        valid = labels != IGNORE_INDEX
        located = batch["located"] & valid
        target = batch["target_corners"].to(corners.dtype)
        if located.any():
            point_l1 = (corners[located] - target[located]).abs().float().mean() * self.cfg.image_size
        else:
            point_l1 = corners.sum() * 0.0
        # a text with no location at all (a plain caption, without traces) says nothing of where its words are
        annotated = valid & located.any(dim=1, keepdim=True)
        if annotated.any():
            conf_bce = F.binary_cross_entropy_with_logits(confidence[annotated].float(), located[annotated].float())
        else:
            conf_bce = confidence.sum() * 0.0
        loss = ce + lc.point_weight * point_l1 + lc.point_weight * conf_bce
        out = {"ce": ce, "point_l1": point_l1, "confidence_bce": conf_bce}
        mask_valid = batch.get("mask_valid")
        if mask_valid is not None and bool(mask_valid.any()) and self.cfg.mask_decoder.trainable:
            logits_m = self.predict_masks(features[mask_valid], batch["mask_boxes"][mask_valid].float())
            out["mask"] = _mask_loss(logits_m.float(), batch["mask_targets"][mask_valid].float())
            loss = loss + lc.mask_weight * out["mask"]
        objects_valid = batch.get("objects_valid")
        if objects_valid is not None and bool(objects_valid.any()) and self.proposal_head is not None:
            index = objects_valid.nonzero()[:, 0].tolist()
            boxes = [batch["object_boxes"][i] for i in index]
            out["proposal"] = self.proposal_head.loss(features.fused[index], boxes)
            loss = loss + lc.proposal_weight * out["proposal"]
        out["loss"] = loss
        return out

    # ----------------------------------------------------------------- inference
    def _decode_fns(self, enc: torch.Tensor, enc_mask: torch.Tensor):
        """-> (step, logits_fn) for `generation`: one KV-cached decoder step, and the vocabulary head."""

        def step(last, cache):
            hidden, cache = self.language_model.decode(last, enc, enc_mask, cache=cache)
            return hidden[:, -1], cache

        def logits_fn(hidden):
            logits = self.language_model.logits(hidden)
            logits[..., PAD_ID] = float("-inf")  # PAD is the decoder start, never an output
            return logits

        return step, logits_fn

    def _points(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder states (..., D) -> corners (..., 2, 2) in [0, 1] and confidence (...) in [0, 1], float32."""
        corners, confidence = self.point_head(hidden)
        return corners.clamp(0, 1), torch.sigmoid(confidence)

    @torch.no_grad()
    def generate(
        self,
        features: ImageFeatures,
        prompts: Prompts,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        with_points: bool = True,
        should_stop: ShouldStop | None = None,
    ) -> list[Generated]:
        """Caption a batch. Returns per sample: ids (T,), corners (T, 2, 2) in [0, 1], confidence (T,) in [0, 1].

        `should_stop()` is asked before every decoder step; True raises `GenerationCancelled`.
        """
        if num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {num_beams}")
        if num_beams > 1:
            found = self.generate_n_best(
                features, prompts, num_beams, max_new_tokens, with_points, should_stop=should_stop, num_return=1
            )
            return [hypotheses[0] for hypotheses in found]
        max_new_tokens = self.decoding_length(max_new_tokens)
        enc, enc_mask = self.encode_prompts(features, prompts)
        step, logits_fn = self._decode_fns(enc, enc_mask)
        points_fn = self._points if with_points else None
        return greedy(step, logits_fn, points_fn, enc.shape[0], max_new_tokens, enc.device, should_stop)

    @torch.no_grad()
    def generate_n_best(
        self,
        features: ImageFeatures,
        prompts: Prompts,
        num_beams: int,
        max_new_tokens: int | None = None,
        with_points: bool = True,
        should_stop: ShouldStop | None = None,
        num_return: int | None = None,
    ) -> list[list[Generated]]:
        """Beam search of width `num_beams`: per sample at most `num_return` (1 to `num_beams`, default `num_beams`)
        best hypotheses, best first, each as `generate` returns one."""
        if num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {num_beams}")
        max_new_tokens = self.decoding_length(max_new_tokens)
        enc, enc_mask = self.encode_prompts(features, prompts)
        b = enc.shape[0]
        enc = enc.repeat_interleave(num_beams, dim=0)
        enc_mask = enc_mask.repeat_interleave(num_beams, dim=0)
        step, logits_fn = self._decode_fns(enc, enc_mask)
        points_fn = self._points if with_points else None
        return beam_search_n_best(
            step,
            logits_fn,
            points_fn,
            b,
            num_beams,
            max_new_tokens,
            enc.device,
            should_stop=should_stop,
            num_return=num_return,
        )

    @property
    def text_tokens_read(self) -> int:
        """The most tokens of a text the decoder reads (teacher-forced, to localize it): `max_text_tokens` less EOS."""
        return self.cfg.language_model.max_text_tokens - 1

    def decoding_length(self, max_new_tokens: int | None) -> int:
        """The decoding length: `max_new_tokens`, or the model's `max_text_tokens` for None."""
        if max_new_tokens is None:
            return self.cfg.language_model.max_text_tokens
        check_length(max_new_tokens)
        return max_new_tokens

    @torch.no_grad()
    def generate_stream(
        self,
        features: ImageFeatures,
        prompts: Prompts,
        max_new_tokens: int | None = None,
        should_stop: ShouldStop | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Greedy decoding that yields each step's ids (B,), corners (B, 2, 2), confidence (B,) and log-probs (B,).

        `should_stop()` is asked before every decoder step; True raises `GenerationCancelled`.
        """
        max_new_tokens = self.decoding_length(max_new_tokens)
        enc, enc_mask = self.encode_prompts(features, prompts)
        step, logits_fn = self._decode_fns(enc, enc_mask)
        for ids, hidden, logp in iter_greedy(step, logits_fn, enc.shape[0], max_new_tokens, enc.device, should_stop):
            corners, confidence = self._points(hidden)
            yield ids, corners, confidence, logp

    @torch.no_grad()
    def localize(self, features: ImageFeatures, prompts: Prompts, texts: list[str]) -> list[Generated]:
        """Referring localization by teacher forcing `texts` through the decoder.

        Returns per sample the text's ids (T,) + EOS, corners (T+1, 2, 2) and confidence (T+1,); the corners
        at EOS (the state that has read the whole expression) are the object's box. `score` is the mean
        log-likelihood of the text.
        """
        tok = self._require_tokenizer()
        seqs = [tok.encode(t, add_eos=False)[: self.text_tokens_read] + [EOS_ID] for t in texts]
        labels, _ = _pad(seqs, IGNORE_INDEX, self.device)
        enc, enc_mask = self.encode_prompts(features, prompts)
        dec_in = _shift_right(labels)
        hidden, _ = self.language_model.decode(dec_in, enc, enc_mask)
        logp = torch.log_softmax(self.language_model.logits(hidden).float(), dim=-1)
        corners, confidence = self._points(hidden)
        out = []
        for b, seq in enumerate(seqs):
            n = len(seq)
            ids = torch.tensor(seq, device=self.device)
            token_logp = logp[b, torch.arange(n, device=self.device), ids]
            out.append(
                Generated(
                    ids=ids,
                    corners=corners[b, :n],
                    confidence=confidence[b, :n],
                    score=float(token_logp.mean()),
                )
            )
        return out

    @torch.no_grad()
    def propose(
        self,
        features: ImageFeatures,
        score_threshold: float = PROPOSAL_SCORE_THRESHOLD,
        nms_iou: float = PROPOSAL_NMS_IOU,
        max_proposals: int = MAX_PROPOSALS,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Object proposals per image: boxes (N, 4) in model-input pixels and scores (N,), best first.

        Kept features (`encode_images(keep=True)`) answer the default threshold and overlap, with at most the
        default number of proposals, from the proposals found when they were kept: NMS keeps the best first, so
        the first `max_proposals` of those are what a search for that many finds.
        """
        if self.proposal_head is None:
            raise RuntimeError(
                f"model {self.name!r} has no proposal head, so it cannot dense-caption: train it on with a training "
                'config whose "model" preset has a "proposal_head" section and whose "init_from" names this model'
            )
        default_search = (score_threshold, nms_iou) == (PROPOSAL_SCORE_THRESHOLD, PROPOSAL_NMS_IOU)
        if features.proposals is not None and default_search and max_proposals <= MAX_PROPOSALS:
            return [(boxes[:max_proposals], scores[:max_proposals]) for boxes, scores in features.proposals]
        found = self.proposal_head.propose(features.fused, score_threshold, nms_iou, max_proposals)
        return [(boxes * self.cfg.image_size, scores) for boxes, scores in found]

    @torch.no_grad()
    def masks(self, features: ImageFeatures, boxes: torch.Tensor) -> torch.Tensor:
        """Mask logits (B, S, S) of the model input for boxes (B, 4) in model-input pixels."""
        return self.predict_masks(features, boxes.float())

    def predict_masks(self, features: ImageFeatures, boxes: torch.Tensor) -> torch.Tensor:
        low = self.mask_head(features.sam, boxes, self.prompt_encoder)
        return upsample_masks(low, self.cfg.image_size)

    def add_proposal_head(self, cfg: ProposalHeadConfig) -> None:
        """Give a model that has none a fresh, untrained proposal head (to fine-tune it for dense captioning)."""
        self.cfg.proposal_head = cfg
        self.proposal_head = ProposalHead(cfg, self.image_encoder.out_dim).to(self.device, self.dtype)

    def add_object_tokens(self, k: int) -> None:
        """Give a model made without them up to `k` object tokens per prompt (see `ExtractorConfig`), to
        fine-tune; the new box projection starts at zero."""
        if self.proposal_head is None:
            raise ValueError(f"model {self.name!r} has no proposal head to find the objects of its object tokens")
        if not self.cfg.extractor.anchor_grid:
            raise ValueError(f"model {self.name!r} has no anchor grid: object tokens are box layouts")
        if self.extractor.object_box_proj is None:
            self.extractor.add_object_tokens(self.cfg.sam.out_chans, self.language_model.dim)
        self.cfg.extractor.object_tokens = k

    def add_object_readings(self) -> None:
        """Give a model with object tokens the (zero) projection of object readings (see `ExtractorConfig`), to
        fine-tune."""
        if not self.cfg.extractor.object_tokens:
            raise ValueError(f"model {self.name!r} has no object tokens to add object readings to")
        if self.extractor.object_reading_proj is None:
            self.extractor.add_object_readings(self.language_model.dim)
        self.cfg.extractor.object_readings = True

    def set_lora_merged(self, merged: bool) -> None:
        self.language_model.set_lora_merged(merged)

    def quantize_language_model(self) -> None:
        """int8 weights for the language model, for faster decoding on CPU (`LanguageModel.quantize_int8`); the
        image encoders and heads stay as they are. Inference only: such a model is not meant to be trained, and
        cannot be saved."""
        self.language_model.quantize_int8()

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError(
                f"model {self.name!r} has no tokenizer: build it with t5_path=<Hugging Face T5 directory with "
                "tokenizer.json> or load it with PixelLLM.from_pretrained(dir)"
            )
        return self.tokenizer

    # ----------------------------------------------------------------- persistence
    def save_pretrained(self, directory) -> None:
        from ..checkpoints import save_pretrained

        if self.language_model.quantized:
            raise ValueError(
                "this model's language model is int8-quantized, which is for inference only: save the float32 model "
                "and quantize it again after loading"
            )
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, device: str | torch.device | None = None, **moved) -> PixelLLM:
        """The model saved in `directory`; `moved`: new places of the official files it was built from
        (`sam_checkpoint=`, `eva_checkpoint=`, `t5_path=`), where they are no longer where `checkpoints.json` says."""
        from ..checkpoints import from_pretrained

        return from_pretrained(directory, device=device, **moved)


def _located(prompts: Prompts, b: int, device: torch.device) -> torch.Tensor:
    """(B,) True where the prompt has a box or a point, by the prompt encoder's own rule (`_where`)."""
    out = torch.zeros(b, dtype=torch.bool, device=device)
    for values, mask in ((prompts.boxes, prompts.box_mask), (prompts.points, prompts.point_mask)):
        rows = _where(mask, values, b)
        if rows is not None:
            out |= rows
    return out


def _float(x: torch.Tensor | None) -> torch.Tensor | None:
    """Prompt coordinates in float32 whatever the model's dtype: in bfloat16 a box corner in [256, 512) model
    pixels would be rounded to an even pixel before the prompt encoder reads it."""
    return None if x is None else x.float()


def _pad(seqs: list[list[int]], value: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists -> ids (B, T) and mask (B, T)."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _shift_right(labels: torch.Tensor) -> torch.Tensor:
    """Decoder inputs from labels (B, T): PAD (the decoder start) then labels[:, :-1]; ignored -> PAD."""
    dec = torch.full_like(labels, PAD_ID)
    dec[:, 1:] = labels[:, :-1]
    return dec.masked_fill(dec == IGNORE_INDEX, PAD_ID)


def _mask_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + dice on mask logits and targets (B, S, S)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    prob = torch.sigmoid(logits).flatten(1)
    t = targets.flatten(1)
    dice = 1 - (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()
