"""Predictor: embed an image once, then caption it, caption regions of it, and localize texts in it.

All coordinates in and out are absolute pixels of the input image (x right, y down, origin top-left;
boxes are x0, y0, x1, y1). Word `start`/`end` are character offsets into the returned text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from .config import MAX_PROPOSALS, PROPOSAL_NMS_IOU, PROPOSAL_SCORE_THRESHOLD
from .modeling.generation import Generated, ShouldStop
from .modeling.pixelllm import ImageFeatures, PixelLLM, Prompts
from .tokenizer import EOS_ID, PAD_ID, words_with_tokens
from .transforms import DecodedImage, ImageTransform, preprocess

LOCATED_SCORE = 0.5  # least confidence of a word that has a location (refined captions snap only those)

Box = tuple[float, float, float, float]
Point = tuple[float, float]


@dataclass
class Word:
    """A word of a caption and where it is: `box` and its centre `point`, and `score`, the point head's
    confidence that the word has a location. Where a refined caption snapped the word to an object proposal,
    `regressed_box` keeps the point head's own box; where a verified caption changed the word, `generated_text`
    keeps the decoder's."""

    text: str
    start: int
    end: int
    point: Point
    box: Box
    score: float
    regressed_box: Box | None = None
    generated_text: str | None = None


@dataclass
class Caption:
    """A caption, its located words, and `score`: the geometric mean of its tokens' probabilities (with beams,
    exp of the beam's length-normalized log-probability)."""

    text: str
    words: list[Word]
    score: float = 0.0


@dataclass
class Localization:
    """Where a text is. `box` is the object proposal nearest the point head's own box when the localization was
    refined (`regressed_box` then keeps the point head's box), else the point head's box."""

    text: str
    box: Box
    score: float
    words: list[Word]
    mask: np.ndarray | None = field(default=None, repr=False)
    regressed_box: Box | None = None


@dataclass
class Region:
    """A dense-captioning result: a proposed object box, its objectness score and its region caption."""

    box: Box
    score: float
    caption: Caption


@dataclass
class ImageEmbedding:
    """One image's encoder outputs (batch of 1) and its resize, reusable for many prompts."""

    features: ImageFeatures
    transform: ImageTransform

    @property
    def original_size(self) -> tuple[int, int]:
        return self.transform.height, self.transform.width

    @property
    def nbytes(self) -> int:
        return self.features.nbytes


class Predictor:
    """Answers many prompts on one image from a single image embedding (like `SamPredictor`)."""

    def __init__(self, model: PixelLLM):
        self.model = model.eval()
        self.embedding: ImageEmbedding | None = None
        self._attribute_class = {w.lower(): c for c, words in model.cfg.attribute_words.items() for w in words}

    # ------------------------------------------------------------------ embeddings
    @torch.no_grad()
    def embed_batch(self, images: Sequence[Image.Image | np.ndarray | DecodedImage]) -> list[ImageEmbedding]:
        """Encode images (PIL, HxWx3 uint8, or `transforms.decode`'s, maybe reduced: coordinates are then in the
        file's pixels) in one batched encoder pass, with what every prompt would compute
        again of an image alone (`encode_images(keep=True)`): the prompts on an embedding do not. Each embedding
        holds memory of its own (`nbytes`), so keeping one does not keep the rest of its batch."""
        if not images:
            return []
        tensors, transforms = zip(
            *(preprocess(im, self.model.cfg.image_size, self.model.cfg.image_padding) for im in images)
        )
        features = self.model.encode_images(torch.stack(tensors).to(self.model.device), keep=True)
        if len(transforms) == 1:
            return [ImageEmbedding(features, transforms[0])]
        return [ImageEmbedding(features[i : i + 1].clone(), t) for i, t in enumerate(transforms)]

    def embed(self, image: Image.Image | np.ndarray | DecodedImage) -> ImageEmbedding:
        return self.embed_batch([image])[0]

    def set_image(self, image: Image.Image | np.ndarray | DecodedImage) -> None:
        """Encode `image` and keep its embedding for the calls that follow (none if encoding it fails)."""
        self.embedding = None
        self.embedding = self.embed(image)

    def reset_image(self) -> None:
        self.embedding = None

    def _current(self) -> ImageEmbedding:
        if self.embedding is None:
            raise RuntimeError("no image set: call predictor.set_image(image) first")
        return self.embedding

    # ------------------------------------------------------------------ captions
    def caption(
        self,
        box: Box | None = None,
        point: Point | None = None,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        refine: bool = True,
        verify: bool = True,
    ) -> Caption:
        """Caption the image, or the region given by `box` or `point`, with a location for every word.

        With `refine` and a model that has a proposal head, every word that has a location (score >=
        `LOCATED_SCORE`) is snapped to the object proposal nearest its box, as `localize` snaps its box: the
        word's box becomes the proposal's, its point that box's centre, and `Word.regressed_box` keeps the
        point head's box. With `verify` too, no `box` (a box prompt names its region already), and a model whose
        config names `attribute_words` (classes such as color and shape), each attribute phrase (a run of words
        of those classes, "large blue triangle", with the words after it up to punctuation or the next phrase,
        "on the left and a") is placed on one proposal: the one most of its words from the run's last word on
        were snapped to (ties to the latest word), or, if an earlier phrase took that one, the nearest one none
        took, while any is left; the run's words, and the words after it snapped with it, move to it. The run's
        words are checked against the model's own region caption of that proposal: where it says another word of
        a word's class, it replaces the word (`text` and the offsets follow; `Word.generated_text` keeps the
        decoder's). Beam search (`num_beams` > 1) answers its likeliest beam, refined and verified so.
        """
        return self.caption_embeddings(
            [self._current()], [box], [point], max_new_tokens, num_beams, refine=refine, verify=verify
        )[0]

    def caption_batch(
        self,
        regions: Sequence[Box | Point | None],
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        refine: bool = True,
        verify: bool = True,
    ) -> list[Caption]:
        """Caption many regions of the current image in one batched pass: each a box, a point, or None."""
        for i, r in enumerate(regions):
            if r is not None and len(r) not in (2, 4):
                raise ValueError(f"regions[{i}] must be a box (4 numbers), a point (2 numbers) or None, got {r}")
        boxes = [tuple(r) if r is not None and len(r) == 4 else None for r in regions]
        points = [tuple(r) if r is not None and len(r) == 2 else None for r in regions]
        emb = self._current()
        return self.caption_embeddings(
            [emb] * len(regions), boxes, points, max_new_tokens, num_beams, refine=refine, verify=verify
        )

    @torch.no_grad()
    def caption_embeddings(
        self,
        embeddings: Sequence[ImageEmbedding],
        boxes: Sequence[Box | None] | None = None,
        points: Sequence[Point | None] | None = None,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        should_stop: ShouldStop | None = None,
        refine: bool = True,
        verify: bool = True,
    ) -> list[Caption]:
        """Caption many (image embedding, optional box or point) pairs in one batched forward pass (`refine` and
        `verify` as in `caption`; the region captions that verify needs make one more batched pass).

        `should_stop()` is asked before every decoder step; True raises `GenerationCancelled`.
        """
        prompts = self._location_prompts(embeddings, boxes, points)
        if not embeddings:
            return []
        features, prompts.image_index = self._distinct(embeddings)
        image_index = prompts.image_index.tolist()
        boxed = [False] * len(embeddings) if boxes is None else [box is not None for box in boxes]
        grounded = refine and self.model.proposal_head is not None
        checked = [self._verifies(refine, verify, b) for b in boxed]
        outputs = self.model.generate(features, prompts, max_new_tokens, num_beams, should_stop=should_stop)
        captions = [self._caption(g, e.transform) for g, e in zip(outputs, embeddings)]
        if not grounded:
            return captions
        proposals = self.model.propose(features)
        for caption, emb, u in zip(captions, embeddings, image_index):
            caption.words = self._snap_words(caption.words, proposals[u], emb.transform)
        todo = [i for i, check in enumerate(checked) if check]
        if not todo:
            return captions
        images = {image_index[i]: embeddings[i] for i in todo}  # each distinct image once
        verified = self._verify_words(
            [captions[i].words for i in todo],
            [image_index[i] for i in todo],
            images,
            {u: self._proposal_boxes(proposals[u], emb.transform) for u, emb in images.items()},
            num_beams,
            should_stop,
        )
        for i, words in zip(todo, verified):
            captions[i] = _rewrite(captions[i], words)
        return captions

    def caption_stream(
        self,
        box: Box | None = None,
        point: Point | None = None,
        max_new_tokens: int | None = None,
        refine: bool = True,
        verify: bool = True,
    ) -> Generator[Word, None, Caption]:
        """Greedy caption of the current image (or a region), yielding each word as soon as it is complete.

        The words equal those of `caption(..., num_beams=1)`, and the generator returns that `Caption`
        (`caption = yield from p.caption_stream()`, or `StopIteration.value`). Beam search cannot stream:
        a beam's words are only known once the search ends. `refine` and `verify` as in `caption` (the words of
        an attribute phrase wait until the phrase's words end, then for its proposal's region caption).
        """
        return self.caption_stream_embedding(self._current(), box, point, max_new_tokens, refine=refine, verify=verify)

    def caption_stream_embedding(
        self,
        embedding: ImageEmbedding,
        box: Box | None = None,
        point: Point | None = None,
        max_new_tokens: int | None = None,
        should_stop: ShouldStop | None = None,
        refine: bool = True,
        verify: bool = True,
    ) -> Generator[Word, None, Caption]:
        """`caption_stream` on a given image embedding (no predictor state: safe beside other calls).

        `should_stop()` is asked before every decoder step; True raises `GenerationCancelled` from the generator.
        A bad box, point or max_new_tokens raises here, not at the first word.
        """
        prompts = self._location_prompts([embedding], [box], [point])
        self.model.decoding_length(max_new_tokens)
        return self._caption_stream(embedding, prompts, box is not None, max_new_tokens, should_stop, refine, verify)

    def _caption_stream(
        self,
        embedding: ImageEmbedding,
        prompts: Prompts,
        has_box: bool,
        max_new_tokens: int | None,
        should_stop: ShouldStop | None,
        refine: bool,
        verify: bool,
    ) -> Generator[Word, None, Caption]:
        tokenizer, transform = self.model.tokenizer, embedding.transform
        proposals = None
        if refine and self.model.proposal_head is not None:
            with torch.no_grad():
                proposals = self.model.propose(embedding.features)[0]
        check = self._verifies(refine, verify, has_box)
        proposal_boxes = {0: self._proposal_boxes(proposals, transform) if check and proposals is not None else []}
        ids: list[int] = []
        corners: list[np.ndarray] = []  # (4,) per token
        confidence: list[np.ndarray] = []  # () per token
        logps: list[float] = []
        words: list[Word] = []
        text, groups = "", []
        said: dict[tuple[int, Box], dict[str, str]] = {}  # region captions' attribute words, by proposal
        taken: set[Box] = set()  # the proposals the attribute phrases so far were moved to
        pending: list[tuple[int, int, Word]] = []  # final words held back until their attribute phrase ends
        rewriter = _Rewriter()

        def located(start: int, end: int, members: list[int]) -> Word:  # a word of the text decoded so far
            word_corners = np.stack([corners[i] for i in members])
            word_conf = np.stack([confidence[i] for i in members])
            word = _word(text, start, end, word_corners, word_conf, transform)
            return word if proposals is None else self._snap_words([word], proposals, transform)[0]

        def release() -> list[Word]:  # the pending words, verified, at their offsets in the text shown
            final = [w for _, _, w in pending]
            if check:
                (final,) = self._verify_words(
                    [final], [0], {0: embedding}, proposal_boxes, 1, should_stop, said, [taken]
                )
            ready = [rewriter.add(text, start, end, w) for (start, end, _), w in zip(pending, final)]
            pending.clear()
            words.extend(ready)
            return ready

        seen = 0  # words of the decoded text located so far
        for step_ids, step_corners, step_conf, step_logp in self.model.generate_stream(
            embedding.features, prompts, max_new_tokens, should_stop
        ):
            token = int(step_ids[0])
            logps.append(float(step_logp[0]))
            if token in (EOS_ID, PAD_ID):
                break
            ids.append(token)
            corners.append(step_corners[0].float().cpu().numpy().reshape(4))
            confidence.append(step_conf[0].float().cpu().numpy())
            text, spans = tokenizer.decode_with_spans(ids)
            groups = words_with_tokens(text, spans)
            for start, end, members in groups[seen:-1]:  # the last word may still grow; every word before is final
                seen += 1
                word = located(start, end, members)
                if pending and not self._continues_phrase(pending[-1][2], word):
                    yield from release()
                pending.append((start, end, word))
                if not (check and any(w.text.lower() in self._attribute_class for _, _, w in pending)):
                    yield from release()
        pending.extend((start, end, located(start, end, members)) for start, end, members in groups[seen:])
        yield from release()
        score = float(np.exp(np.mean(logps)))  # as `greedy`: the mean log-prob, EOS included
        return Caption(text=rewriter.finish(text), words=words, score=score)

    # ------------------------------------------------------------------ dense captions
    def dense_caption(
        self,
        score_threshold: float = PROPOSAL_SCORE_THRESHOLD,
        nms_iou: float = PROPOSAL_NMS_IOU,
        max_regions: int = MAX_PROPOSALS,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
    ) -> list[Region]:
        """Every salient object of the current image: proposals from the proposal head (objectness >=
        `score_threshold`, overlaps above `nms_iou` suppressed, at most `max_regions`), each captioned as a
        region. Best score first."""
        return self.dense_caption_embeddings(
            [self._current()], score_threshold, nms_iou, max_regions, max_new_tokens, num_beams
        )[0]

    @torch.no_grad()
    def dense_caption_embeddings(
        self,
        embeddings: Sequence[ImageEmbedding],
        score_threshold: float = PROPOSAL_SCORE_THRESHOLD,
        nms_iou: float = PROPOSAL_NMS_IOU,
        max_regions: int = MAX_PROPOSALS,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        should_stop: ShouldStop | None = None,
    ) -> list[list[Region]]:
        """`dense_caption` for many images: one proposal pass, then every region captioned in one batch
        (`should_stop` as in `caption_embeddings`)."""
        if not 0 <= score_threshold <= 1 or not 0 < nms_iou <= 1 or max_regions < 1:
            raise ValueError(
                f"need 0 <= score_threshold <= 1, 0 < nms_iou <= 1 and max_regions >= 1, got {score_threshold}, "
                f"{nms_iou}, {max_regions}"
            )
        if not embeddings:
            return []
        features = ImageFeatures.cat([e.features for e in embeddings])
        proposals = self.model.propose(features, score_threshold, nms_iou, max_regions)
        size = self.model.cfg.image_size
        found = []  # (image index, box in image pixels, score)
        for i, (emb, (model_boxes, scores)) in enumerate(zip(embeddings, proposals)):
            for box, score in zip((model_boxes / size).cpu().numpy(), scores.tolist()):
                box = _box(box, emb.transform)
                if _has_area(box):  # boxes clipped to nothing are dropped
                    found.append((i, box, score))
        captions = (
            self.caption_embeddings(
                [embeddings[i] for i, _, _ in found],
                [b for _, b, _ in found],
                None,
                max_new_tokens,
                num_beams,
                should_stop,
            )
            if found
            else []
        )
        regions: list[list[Region]] = [[] for _ in embeddings]
        for (i, box, score), caption in zip(found, captions):
            regions[i].append(Region(box, score, caption))
        return regions

    # ------------------------------------------------------------------ localization
    def localize(self, text: str, mask: bool = False, refine: bool = True) -> Localization:
        """Find what `text` refers to: its box (and mask), and a location for each of its words.

        With `refine` and a model that has a proposal head, the point head's box is replaced by the nearest
        object proposal (centre distance; objectness >= `PROPOSAL_SCORE_THRESHOLD`): the language model picks
        the object, the proposal head draws its box. The point head's box stays in `regressed_box`. A nearest
        proposal that lies wholly in the padding outside the image is not taken.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}; for several, use localize_batch")
        return self.localize_embeddings([self._current()], [text], mask, refine)[0]

    def localize_batch(self, texts: Sequence[str], mask: bool = False, refine: bool = True) -> list[Localization]:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, got one string; for one text, use localize")
        emb = self._current()
        return self.localize_embeddings([emb] * len(texts), texts, mask, refine)

    def check_text(self, text: str) -> None:
        """Raise ValueError if `text` is empty or longer than the model reads: its `max_text_tokens` less the
        end token (a longer text would be cut, and its box found from the words before the cut)."""
        text = collapse_whitespace(text)
        if not text:
            raise ValueError("the text is empty")
        limit = self.model.text_tokens_read
        tokens = len(self.model._require_tokenizer().encode(text, add_eos=False))
        if tokens > limit:
            raise ValueError(f"the text is {tokens} tokens; the model reads at most {limit}: shorten it")

    @torch.no_grad()
    def localize_embeddings(
        self, embeddings: Sequence[ImageEmbedding], texts: Sequence[str], mask: bool = False, refine: bool = True
    ) -> list[Localization]:
        """Localize texts[i] in embeddings[i], all in one batched forward pass (see `localize`). A text is read with
        its whitespace collapsed (a trailing space or a line break is a token of its own, which moves its box): that
        is the result's `text`, which word offsets index."""
        if len(texts) != len(embeddings):
            raise ValueError(f"got {len(embeddings)} images but {len(texts)} texts")
        if not texts:
            return []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a string")
            try:
                self.check_text(text)
            except ValueError as e:
                raise ValueError(f"texts[{i}]: {e}" if len(texts) > 1 else str(e)) from None
        texts = [collapse_whitespace(t) for t in texts]
        cfg = self.model.cfg
        features, image_index = self._distinct(embeddings)
        prompts = Prompts(texts=[cfg.localize_prompt + t for t in texts], image_index=image_index)
        outputs = self.model.localize(features, prompts, list(texts))
        results = []
        for g, text, emb in zip(outputs, texts, embeddings):
            tok_ids, offsets = self.model.tokenizer.encode_with_offsets(text)
            n = min(len(tok_ids), len(g.ids) - 1)
            words = _group_words(text, offsets[:n], g.corners[:n], g.confidence[:n], emb.transform)
            box = _box(g.corners[-1].cpu().numpy().reshape(4), emb.transform)
            results.append(Localization(text=text, box=box, score=float(np.exp(g.score)), words=words))
        if refine and self.model.proposal_head is not None:
            proposals = self.model.propose(features)
            size = self.model.cfg.image_size
            for r, g, emb, u in zip(results, outputs, embeddings, image_index.tolist()):
                # the point head's box corners in any order: only their centre counts
                point_head_centre = g.corners[-1].float().cpu().numpy().reshape(1, 2, 2).mean(axis=1) * size
                (refined,) = self._nearest_proposals(point_head_centre, proposals[u], emb.transform)
                if refined is not None:
                    r.regressed_box, r.box = r.box, refined
        if mask:
            masks = self.masks_for_boxes(features[image_index], embeddings, [r.box for r in results])
            for r, m in zip(results, masks):
                r.mask = m
        return results

    @torch.no_grad()
    def masks_for_boxes(
        self, features: ImageFeatures, embeddings: Sequence[ImageEmbedding], boxes: Sequence[Box]
    ) -> list[np.ndarray]:
        """The mask head's mask (H, W) bool, original image pixels, for boxes[i] on the i-th image of `features`
        (B images, embeddings[i] its resize); boxes are x0, y0, x1, y1 in original image pixels."""
        model_boxes = np.stack([emb.transform.to_model(np.array(box)) for box, emb in zip(boxes, embeddings)])
        logits = self.model.masks(features, torch.from_numpy(model_boxes).to(self.model.device))
        return [emb.transform.mask_from_model(m) for emb, m in zip(embeddings, logits)]

    # ------------------------------------------------------------------ helpers
    def _distinct(self, embeddings: Sequence[ImageEmbedding]) -> tuple[ImageFeatures, torch.Tensor]:
        """The features of each distinct embedding once (U, ...) and the embedding of each prompt (B,)."""
        slot: dict[int, int] = {}
        index = [slot.setdefault(id(e), len(slot)) for e in embeddings]
        distinct = list({id(e): e for e in embeddings}.values())
        features = ImageFeatures.cat([e.features for e in distinct])
        return features, torch.tensor(index, device=self.model.device)

    def _location_prompts(
        self,
        embeddings: Sequence[ImageEmbedding],
        boxes: Sequence[Box | None] | None,
        points: Sequence[Point | None] | None,
    ) -> Prompts:
        n = len(embeddings)
        boxes = list(boxes) if boxes is not None else [None] * n
        points = list(points) if points is not None else [None] * n
        if len(boxes) != n or len(points) != n:
            raise ValueError(f"got {n} images but {len(boxes)} boxes and {len(points)} points")
        cfg = self.model.cfg
        box_arr = np.zeros((n, 4), dtype=np.float32)
        point_arr = np.zeros((n, 2), dtype=np.float32)
        texts = []
        for i, (emb, box, point) in enumerate(zip(embeddings, boxes, points)):
            if box is not None and point is not None:
                raise ValueError(f"prompt {i}: give a box or a point, not both")
            h, w = emb.original_size
            if box is not None:
                _check_box(box, w, h)
                box_arr[i] = emb.transform.to_model(np.array(box))
            if point is not None:
                _check_point(point, w, h)
                point_arr[i] = emb.transform.to_model(np.array(point))
            texts.append(cfg.caption_prompt if box is None and point is None else cfg.region_prompt)
        device = self.model.device
        return Prompts(
            texts=texts,
            boxes=torch.from_numpy(box_arr).to(device),
            box_mask=torch.tensor([b is not None for b in boxes], device=device),
            points=torch.from_numpy(point_arr).to(device),
            point_mask=torch.tensor([p is not None for p in points], device=device),
        )

    def _nearest_proposals(
        self, centres: np.ndarray, proposals: tuple[torch.Tensor, torch.Tensor], transform: ImageTransform
    ) -> list[Box | None]:
        """For centres (N, 2) in model-input pixels: the box, in image pixels, of the proposal (`PixelLLM.propose`'s
        boxes (P, 4) and scores, model-input pixels) whose centre is nearest each (L1); None without proposals, or
        where the nearest lies wholly in the padding outside the image."""
        boxes = proposals[0].float().cpu().numpy()
        if len(boxes) == 0:
            return [None] * len(centres)
        in_image = self._proposal_boxes(proposals, transform)
        nearest = np.abs(centres[:, None] - (boxes[None, :, :2] + boxes[None, :, 2:]) / 2).sum(axis=-1).argmin(axis=1)
        return [in_image[k] for k in nearest]

    def _proposal_boxes(
        self, proposals: tuple[torch.Tensor, torch.Tensor], transform: ImageTransform
    ) -> list[Box | None]:
        """`PixelLLM.propose`'s boxes (P, 4) in model-input pixels -> image pixels; None where one lies wholly in
        the padding outside the image."""
        size = self.model.cfg.image_size
        in_image = [_box(b / size, transform) for b in proposals[0].float().cpu().numpy()]
        return [b if _has_area(b) else None for b in in_image]

    def _snap_words(
        self, words: list[Word], proposals: tuple[torch.Tensor, torch.Tensor], transform: ImageTransform
    ) -> list[Word]:
        """`words` with every located one (score >= `LOCATED_SCORE`) moved to its nearest proposal (see `caption`)."""
        located = [i for i, w in enumerate(words) if w.score >= LOCATED_SCORE]
        if not located:
            return words
        boxes = transform.to_model(np.array([words[i].box for i in located]))  # (N, 4) model-input pixels
        snapped = list(words)
        for i, refined in zip(
            located, self._nearest_proposals((boxes[:, :2] + boxes[:, 2:]) / 2, proposals, transform)
        ):
            if refined is not None:
                snapped[i] = replace(words[i], box=refined, point=centre(refined), regressed_box=words[i].box)
        return snapped

    def _verifies(self, refine: bool, verify: bool, has_box: bool) -> bool:
        """Does a caption so asked for get verified (see `caption`)?"""
        return (
            refine and verify and not has_box and self.model.proposal_head is not None and bool(self._attribute_class)
        )

    def _verify_words(
        self,
        word_lists: Sequence[list[Word]],
        images: Sequence[int],
        embeddings: dict[int, ImageEmbedding],
        proposals: dict[int, list[Box | None]],
        num_beams: int,
        should_stop: ShouldStop | None,
        said: dict[tuple[int, Box], dict[str, str]] | None = None,
        taken: Sequence[set[Box]] | None = None,
    ) -> list[list[Word]]:
        """Each refined word list of image `images[i]` (`embeddings[image]`, its proposals `proposals[image]` in
        image pixels) with its attribute phrases grounded (`_ground_phrases`, `taken[i]` the
        proposals earlier phrases of list i took) and verified (see `caption`); the region captions' attribute
        words are kept in `said` and taken from it when there."""
        said = {} if said is None else said
        taken = [set() for _ in word_lists] if taken is None else taken
        if len(taken) != len(word_lists):
            raise ValueError(f"{len(taken)} taken sets for {len(word_lists)} word lists")
        grounded = [self._ground_phrases(w, proposals[u], t) for w, u, t in zip(word_lists, images, taken)]
        word_lists, regions = [words for words, _ in grounded], [r for _, r in grounded]
        missing = [(u, b) for r, u in zip(regions, images) for b in r if b is not None and (u, b) not in said]
        said.update(self._region_attributes(missing, embeddings, num_beams, should_stop))
        return [
            [w if b is None else self._verified(w, said[(u, b)]) for w, b in zip(words, r)]
            for words, r, u in zip(word_lists, regions, images)
        ]

    def _attribute_runs(self, words: list[Word]) -> list[list[int]]:
        """Indices of each attribute phrase of `words`: a run of words of attribute classes ("large blue triangle")
        with one character, a space, between neighbours (punctuation ends a phrase: "red star, blue circle")."""
        runs: list[list[int]] = [[]]
        for i, w in enumerate(words):
            if runs[-1] and (w.text.lower() not in self._attribute_class or w.start != words[i - 1].end + 1):
                runs.append([])
            if w.text.lower() in self._attribute_class:
                runs[-1].append(i)
        return [run for run in runs if run]

    def _attribute_phrases(self, words: list[Word]) -> list[tuple[list[int], list[int]]]:
        """Each attribute phrase of `words`: its run (`_attribute_runs`) and the words that place it, its last
        word (the head) and the words after it up to punctuation or the next run ("star at the top and a")."""
        runs = self._attribute_runs(words)
        phrases = []
        for k, run in enumerate(runs):
            end = runs[k + 1][0] if k + 1 < len(runs) else len(words)
            span = [run[-1]]
            while span[-1] + 1 < end and words[span[-1] + 1].start == words[span[-1]].end + 1:
                span.append(span[-1] + 1)
            phrases.append((run, span))
        return phrases

    def _continues_phrase(self, previous: Word, word: Word) -> bool:
        """Does `word`, after `previous`, stay in `previous`'s attribute phrase (`_attribute_phrases`)?"""
        is_attribute = word.text.lower() in self._attribute_class
        return word.start == previous.end + 1 and (previous.text.lower() in self._attribute_class or not is_attribute)

    def _anchor(self, words: list[Word], span: list[int]) -> Word | None:
        """The word of `span` that places its phrase: of the words snapped to a proposal, the latest of those
        snapped to the proposal most of them were (a phrase's later words, "at the top", come once the decoder
        has said which object it means); None where none was snapped."""
        snapped = [words[i] for i in span if words[i].regressed_box is not None]
        if not snapped:
            return None
        votes = Counter(w.box for w in snapped)
        most = max(votes.values())
        return [w for w in snapped if votes[w.box] == most][-1]

    def _ground_phrases(
        self, words: list[Word], proposals: list[Box | None], taken: set[Box]
    ) -> tuple[list[Word], list[Box | None]]:
        """Place each attribute phrase of `words` on one proposal: its anchor's (`_anchor`) or, where an earlier
        phrase took that one, the proposal (of `proposals`, image pixels) nearest the anchor's point-head box that
        none took, while one is left; `taken` gains each phrase's. Returns `words` with the snapped words of each
        placed phrase's run, and the words after its head that voted for its anchor's proposal ("on the left"),
        moved to its proposal; and per word the proposal that checks it (its run's; None for other words)."""
        grounded = list(words)
        regions: list[Box | None] = [None] * len(words)
        for run, span in self._attribute_phrases(words):
            anchor = self._anchor(words, span)
            if anchor is None:
                continue
            box = anchor.box
            free = [b for b in proposals if b is not None and b not in taken]
            if box in taken and free:
                point = np.array(centre(anchor.regressed_box))
                box = min(free, key=lambda b: float(np.abs(np.array(centre(b)) - point).sum()))
            followers = [j for j in span[1:] if words[j].regressed_box is not None and words[j].box == anchor.box]
            for j in run + followers:
                if words[j].regressed_box is not None:
                    grounded[j] = replace(words[j], box=box, point=centre(box))
            for j in run:
                regions[j] = box
            taken.add(box)
        return grounded, regions

    def _region_attributes(
        self,
        regions: Sequence[tuple[int, Box]],
        embeddings: dict[int, ImageEmbedding],
        num_beams: int,
        should_stop: ShouldStop | None,
    ) -> dict[tuple[int, Box], dict[str, str]]:
        """For (image, box) regions (`embeddings[image]`, box in image pixels): the first word of each attribute
        class, lower-case, in the model's region caption of the box, all distinct regions captioned in one batched
        pass (to the model's `max_text_tokens`: a caller's `max_new_tokens` bounds its caption, not these)."""
        distinct = list(dict.fromkeys(regions))
        if not distinct:
            return {}
        captions = self.caption_embeddings(
            [embeddings[u] for u, _ in distinct],
            boxes=[box for _, box in distinct],
            num_beams=num_beams,
            should_stop=should_stop,
            refine=False,
        )
        said: dict[tuple[int, Box], dict[str, str]] = {}
        for region, caption in zip(distinct, captions):
            found = said.setdefault(region, {})
            for w in caption.words:
                if w.text.lower() in self._attribute_class:
                    found.setdefault(self._attribute_class[w.text.lower()], w.text.lower())
        return said

    def _verified(self, word: Word, said: dict[str, str]) -> Word:
        """Attribute word `word`, or the word of its class its phrase's region caption `said` where that differs."""
        new = said.get(self._attribute_class[word.text.lower()])
        if new is None or new == word.text.lower():
            return word
        return replace(word, text=new.capitalize() if word.text[:1].isupper() else new, generated_text=word.text)

    def _caption(self, g: Generated, transform: ImageTransform) -> Caption:
        ids = [int(i) for i in g.ids if int(i) not in (EOS_ID, PAD_ID)]
        n = len(ids)
        words, text = self._words(ids, g.corners[:n], g.confidence[:n], transform)
        return Caption(text=text, words=words, score=float(np.exp(g.score)))

    def _words(
        self, ids: list[int], corners: torch.Tensor, confidence: torch.Tensor, transform: ImageTransform
    ) -> tuple[list[Word], str]:
        text, spans = self.model.tokenizer.decode_with_spans(ids)
        return _group_words(text, spans, corners, confidence, transform), text


class _Rewriter:
    """Builds a text word by word from a source text whose word spans take new words (the text between words is
    kept), and gives each new word its offsets in the built text."""

    def __init__(self) -> None:
        self.text = ""
        self._end = 0

    def add(self, source: str, start: int, end: int, word: Word) -> Word:
        """`word` in place of source[start:end] (spans in order; `source` may grow between calls)."""
        self.text += source[self._end : start]
        new_start = len(self.text)
        self.text += word.text
        self._end = end
        return replace(word, start=new_start, end=len(self.text))

    def finish(self, source: str) -> str:
        return self.text + source[self._end :]


def _rewrite(caption: Caption, words: list[Word]) -> Caption:
    """`caption` with `words` (in order, one per word, texts maybe changed) in place of its words."""
    rewriter = _Rewriter()
    placed = [
        rewriter.add(caption.text, old.start, old.end, new) for old, new in zip(caption.words, words, strict=True)
    ]
    return Caption(rewriter.finish(caption.text), placed, caption.score)


def collapse_whitespace(text: str) -> str:
    """`text` with every run of whitespace (spaces, tabs, line breaks) one space, none at either end."""
    return " ".join(text.split())


def _group_words(
    text: str,
    spans: list[tuple[int, int]],
    corners: torch.Tensor,
    confidence: torch.Tensor,
    transform: ImageTransform,
) -> list[Word]:
    """Words of `text` located by their tokens' corners (T, 2, 2) and confidence (T,)."""
    corners_np = corners.float().cpu().numpy().reshape(-1, 4)
    conf_np = confidence.float().cpu().numpy()
    return [
        _word(text, start, end, corners_np[members], conf_np[members], transform)
        for start, end, members in words_with_tokens(text, spans)
    ]


def _word(
    text: str, start: int, end: int, corners: np.ndarray, confidence: np.ndarray, transform: ImageTransform
) -> Word:
    """The word text[start:end] with the mean box of its tokens' corners (N, 4) and their mean confidence (N,)."""
    box = _box(corners.mean(axis=0), transform)
    return Word(text[start:end], start, end, centre(box), box, float(confidence.mean()))


def centre(box: Box) -> Point:
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def _box(corners: np.ndarray, transform: ImageTransform) -> Box:
    """Normalized corners (4,) in any order -> (x0, y0, x1, y1) image pixels with x0 <= x1, y0 <= y1."""
    x0, y0, x1, y1 = transform.from_normalized(corners).tolist()
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _has_area(box: Box) -> bool:
    return box[2] > box[0] and box[3] > box[1]


def _finite(values: Sequence[float], n: int) -> np.ndarray | None:
    """`values` as n finite floats, or None if they are not n finite numbers (strings and None are not)."""
    try:
        array = np.asarray(values)
    except ValueError:  # ragged
        return None
    if array.shape != (n,) or array.dtype.kind not in "iuf":
        return None
    array = array.astype(np.float64)
    return array if np.isfinite(array).all() else None


def _check_box(box: Sequence[float], width: int, height: int) -> None:
    numbers = _finite(box, 4)
    if numbers is None:
        raise ValueError(f"box must be 4 finite numbers x0, y0, x1, y1, got {box}")
    x0, y0, x1, y1 = numbers
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {tuple(box)} must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")


def _check_point(point: Sequence[float], width: int, height: int) -> None:
    numbers = _finite(point, 2)
    if numbers is None:
        raise ValueError(f"point must be 2 finite numbers x, y, got {point}")
    x, y = numbers
    if not (0 <= x <= width and 0 <= y <= height):
        raise ValueError(f"point {tuple(point)} must lie in the image (0..{width}, 0..{height})")
