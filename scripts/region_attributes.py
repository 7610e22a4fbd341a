"""Which words of a region caption are right: color, shape, both, or another object's color and shape.

python scripts/region_attributes.py --model weights/pixelllm-tiny --num-scenes 60 --seed 1000 --renderer independent
"""

import argparse

import torch

from pixelllm.build import load_model
from pixelllm.evaluate import _color_shape, generated_scenes
from pixelllm.predictor import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="weights/pixelllm-tiny")
    parser.add_argument("--num-scenes", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--renderer", choices=["independent", "synthetic"], default="independent")
    args = parser.parse_args()
    torch.set_num_threads(1)
    predictor = Predictor(load_model(args.model))
    n = color = shape = both = other = 0
    for scene in generated_scenes(args.num_scenes, args.seed, args.renderer):
        emb = predictor.embed(scene.image)
        captions = predictor.caption_embeddings([emb] * len(scene.objects), boxes=[o.box for o in scene.objects])
        in_scene = {(o.color, o.shape) for o in scene.objects}
        for obj, caption in zip(scene.objects, captions):
            said = _color_shape(caption.text)
            n += 1
            color += said[0] == obj.color
            shape += said[1] == obj.shape
            both += said == (obj.color, obj.shape)
            other += said != (obj.color, obj.shape) and said in in_scene
    print(
        f"objects {n}: color right {color / n:.1%}, shape right {shape / n:.1%}, both {both / n:.1%}, "
        f"another object of the scene named {other / n:.1%}"
    )


if __name__ == "__main__":
    main()
