"""The coloured-shapes data of this recipe: its palette, how a shape is drawn, and a judge of colour and shape.

``make_dataset.py`` draws the data with ``draw_shape``; ``unimm eval`` scores generated images with ``judge``:

    unimm eval CHECKPOINT --task prompt_following --dataset data/shapes/test --judge recipes/shapes/shapes.py:judge

An image is right when its colour and its shape both match the prompt ("a red circle"). Colour: the
palette colour nearest to the mean of the pixels that differ from the background. Shape: how much of its
bounding box the shape fills (square about 1, circle pi/4, triangle 1/2).
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 245)
MIN_SIDE, MAX_SIDE = 0.45, 0.85  # a shape's bounding box, as a share of the image side


FOREGROUND_DISTANCE = 60  # RGB distance from the background beyond which a pixel is part of the shape
MIN_FOREGROUND_PIXELS = 4
SQUARE_FILL, CIRCLE_FILL = 0.9, 0.62  # fill ratio above which a shape is a square / a circle


def draw_shape(shape: str, colour: str, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUND)
    side = round(size * rng.uniform(MIN_SIDE, MAX_SIDE))
    left, top = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (left, top, left + side - 1, top + side - 1)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left + (side - 1) / 2, top), (box[2], box[3]), (left, box[3])], fill=fill)
    return image


def colour_and_shape(image: Image.Image) -> tuple[str | None, str | None]:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    mask = np.linalg.norm(pixels - np.array(BACKGROUND), axis=-1) > FOREGROUND_DISTANCE
    if mask.sum() < MIN_FOREGROUND_PIXELS:
        return None, None
    mean = pixels[mask].mean(axis=0)
    colour = min(COLOURS, key=lambda name: np.linalg.norm(mean - np.array(COLOURS[name])))
    rows, columns = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1)
    fill = mask.sum() / box
    shape = "square" if fill > SQUARE_FILL else "circle" if fill > CIRCLE_FILL else "triangle"
    return colour, shape


def judge(images: list[Image.Image], prompts: list[str]) -> list[bool]:
    verdicts = []
    for image, prompt in zip(images, prompts):
        words = set(prompt.lower().replace(".", " ").split())
        colour, shape = colour_and_shape(image)
        wanted_shape = next((name for name in SHAPES if name in words), None)
        wanted_colour = next((name for name in COLOURS if name in words), None)
        verdicts.append(colour == wanted_colour and shape == wanted_shape)
    return verdicts
