"""One PNG of titled sections, each a flow of cards: lines of text and rows of images, top to bottom.

What `unimm demo` draws its whole show on. Text is wrapped to the width it has, by the font's measured
widths, and a card grows to hold it: a label is never cut. Images are enlarged by a whole factor (nearest
neighbour, so the model's pixels stay visible) and keep their aspect ratio; a wide image widens its card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

TEXT_SIZE = 13  # points of the body text
TITLE_SIZE = 17  # points of section titles
LINE_SPACING = 3  # pixels between wrapped lines
IMAGE_SIDE = 96  # the shorter side of an image is enlarged to at least this many pixels
IMAGE_GAP = 4  # pixels between the images of a row
MAX_IMAGES_PER_ROW = 2  # more images than this in one piece go into a square-ish grid
CARD_TEXT_WIDTH = 110  # the narrowest text column of a card, in pixels
CARD_PADDING = 6
CARD_GAP = 10  # between cards, and between a section's lines of cards
SECTION_GAP = 18  # between sections, across and down
TITLE_WRAP_WIDTH = 320  # a title may widen a narrow section up to this many pixels, and wraps beyond
PAGE_MARGIN = 12
PAGE_MAX_WIDTH = 1400  # cards wrap to a new line beyond this
BACKGROUND, CARD_BACKGROUND, CARD_BORDER = "white", (246, 246, 246), (210, 210, 210)
TITLE_COLOUR, TEXT_COLOUR = (20, 20, 20), (30, 30, 30)


@dataclass
class Text:
    """A paragraph, wrapped to the card's width."""

    text: str
    colour: tuple[int, int, int] = TEXT_COLOUR


@dataclass
class Images:
    """Images side by side (more than ``MAX_IMAGES_PER_ROW``: a grid), each enlarged to ``IMAGE_SIDE``."""

    images: list[Image.Image]


@dataclass
class Card:
    """One example: its pieces from top to bottom."""

    pieces: list[Text | Images] = field(default_factory=list)


@dataclass
class Section:
    """A titled group of cards."""

    title: str
    cards: list[Card]


Typeface = ImageFont.ImageFont | ImageFont.FreeTypeFont


def font(size: int) -> Typeface:
    """Pillow's bundled font at ``size`` points (its fixed bitmap font where FreeType is missing)."""
    return ImageFont.load_default(size=size)


def wrap(text: str, width: int, typeface: Typeface) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels, breaking between words, and inside a word only
    when the word alone is wider; every character is kept."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if typeface.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for character in word:  # a word wider than the line: broken where it must be
                if line and typeface.getlength(line + character) > width:
                    lines.append(line)
                    line = ""
                line += character
        lines.append(line)
    return lines


def _enlarged(image: Image.Image) -> Image.Image:
    factor = max(1, math.ceil(IMAGE_SIDE / min(image.size)))
    return image.convert("RGB").resize(
        (image.width * factor, image.height * factor), Image.Resampling.NEAREST
    )


def _image_grid(images: list[Image.Image]) -> Image.Image:
    """Enlarged images in rows of ``MAX_IMAGES_PER_ROW`` (a square-ish grid beyond that), on white."""
    enlarged = [_enlarged(image) for image in images]
    columns = len(enlarged) if len(enlarged) <= MAX_IMAGES_PER_ROW else math.ceil(math.sqrt(len(enlarged)))
    rows = math.ceil(len(enlarged) / columns)
    cell_width, cell_height = max(im.width for im in enlarged), max(im.height for im in enlarged)
    grid = Image.new(
        "RGB",
        (columns * cell_width + (columns - 1) * IMAGE_GAP, rows * cell_height + (rows - 1) * IMAGE_GAP),
        CARD_BACKGROUND,
    )
    for index, image in enumerate(enlarged):
        row, column = divmod(index, columns)
        grid.paste(image, (column * (cell_width + IMAGE_GAP), row * (cell_height + IMAGE_GAP)))
    return grid


def _render_card(card: Card, typeface: Typeface) -> Image.Image:
    """The card drawn on its own: as wide as its widest image row (at least ``CARD_TEXT_WIDTH``), as tall as
    its pieces."""
    grids = [_image_grid(piece.images) if isinstance(piece, Images) else None for piece in card.pieces]
    inner = max([CARD_TEXT_WIDTH, *(grid.width for grid in grids if grid is not None)])
    line_height = _line_height(typeface)
    blocks: list[tuple[Image.Image | list[str], tuple[int, int, int]]] = []
    height = CARD_PADDING
    for piece, grid in zip(card.pieces, grids):
        if grid is not None:
            blocks.append((grid, TEXT_COLOUR))
            height += grid.height + LINE_SPACING
        else:
            lines = wrap(piece.text, inner, typeface)
            blocks.append((lines, piece.colour))
            height += len(lines) * line_height
    height += CARD_PADDING
    picture = Image.new("RGB", (inner + 2 * CARD_PADDING, height), CARD_BACKGROUND)
    draw = ImageDraw.Draw(picture)
    top = CARD_PADDING
    for block, colour in blocks:
        if isinstance(block, Image.Image):
            picture.paste(block, (CARD_PADDING, top))
            top += block.height + LINE_SPACING
            continue
        for line in block:
            draw.text((CARD_PADDING, top), line, fill=colour, font=typeface)
            top += line_height
    draw.rectangle((0, 0, picture.width - 1, picture.height - 1), outline=CARD_BORDER)
    return picture


def _flow(blocks: list[Image.Image], width: int, gap: int) -> list[list[Image.Image]]:
    """Blocks left to right in lines no wider than ``width`` (a wider block gets a line of its own)."""
    lines: list[list[Image.Image]] = []
    used = 0
    for block in blocks:
        if lines and used + gap + block.width <= width:
            lines[-1].append(block)
            used += gap + block.width
        else:
            lines.append([block])
            used = block.width
    return lines


def _stack(
    lines: list[list[Image.Image]],
    gap: int,
    picture: Image.Image | None = None,
    origin: tuple[int, int] = (0, 0),
) -> int:
    """The height of lines of blocks ``gap`` apart, pasted onto ``picture`` (if given) from ``origin`` down."""
    height = 0
    for line in lines:
        left = origin[0]
        for block in line:
            if picture is not None:
                picture.paste(block, (left, origin[1] + height))
            left += block.width + gap
        height += max(block.height for block in line) + gap
    return height - gap if lines else 0


def _line_width(line: list[Image.Image], gap: int) -> int:
    return sum(block.width for block in line) + gap * (len(line) - 1)


def _render_section(section: Section, body: Typeface, title_face: Typeface, max_width: int) -> Image.Image:
    """A section on its own: its title, wrapped, over its cards in lines. As wide as its cards (a short title
    may widen it up to ``TITLE_WRAP_WIDTH``), at most ``max_width``."""
    lines = _flow([_render_card(card, body) for card in section.cards], max_width, CARD_GAP)
    cards_width = max((_line_width(line, CARD_GAP) for line in lines), default=0)
    title_width = min(math.ceil(title_face.getlength(section.title)), TITLE_WRAP_WIDTH)
    width = min(max_width, max(cards_width, title_width))
    titles = wrap(section.title, width, title_face)
    title_line = _line_height(title_face)
    top = len(titles) * title_line + LINE_SPACING
    height = top + _stack(lines, CARD_GAP)
    picture = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    for number, title in enumerate(titles):
        draw.text((0, number * title_line), title, fill=TITLE_COLOUR, font=title_face)
    _stack(lines, CARD_GAP, picture, (0, top))
    return picture


def _line_height(typeface: Typeface) -> int:
    return typeface.getbbox("Ag")[3] + LINE_SPACING


def render_sections(sections: list[Section], header: str = "") -> Image.Image:
    """The whole picture: an optional header paragraph, then the sections, each a title over its cards, side by
    side where they fit in ``PAGE_MAX_WIDTH``."""
    body, title_face = font(TEXT_SIZE), font(TITLE_SIZE)
    content_width = PAGE_MAX_WIDTH - 2 * PAGE_MARGIN
    blocks = [_render_section(section, body, title_face, content_width) for section in sections]
    lines = _flow(blocks, content_width, SECTION_GAP)
    width = max([CARD_TEXT_WIDTH, *(_line_width(line, SECTION_GAP) for line in lines)])
    header_lines = wrap(header, width, body) if header else []
    header_height = len(header_lines) * _line_height(body) + (SECTION_GAP if header_lines else 0)
    sections_height = _stack(lines, SECTION_GAP)
    page = Image.new(
        "RGB", (width + 2 * PAGE_MARGIN, header_height + sections_height + 2 * PAGE_MARGIN), BACKGROUND
    )
    draw = ImageDraw.Draw(page)
    for number, line in enumerate(header_lines):
        draw.text((PAGE_MARGIN, PAGE_MARGIN + number * _line_height(body)), line, fill=TEXT_COLOUR, font=body)
    _stack(lines, SECTION_GAP, page, (PAGE_MARGIN, PAGE_MARGIN + header_height))
    return page
