"""The procedural shapes data set: determinism, any size, captions that say what the pixels show."""

import numpy as np
import pytest
import torch

from linfusion.bundled import shapes


def test_same_seed_same_pixels_and_caption() -> None:
    for seed in (0, 7, 123_456):
        image_a, scene_a = shapes.render_seed(seed)
        image_b, scene_b = shapes.render_seed(seed)
        assert np.array_equal(image_a, image_b)
        assert scene_a.caption() == scene_b.caption()


def test_different_seeds_differ() -> None:
    images, scenes = shapes.batch(range(200))
    assert len({image.tobytes() for image in images}) == 200
    assert len({scene.caption() for scene in scenes}) > 100
    counts = {len(scene.objects) for scene in scenes}
    assert counts == {1, 2, 3}


@pytest.mark.parametrize("size", [16, 32, 48, 96])
def test_any_image_size(size: int) -> None:
    image, scene = shapes.render_seed(11, size=size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == shapes.BACKGROUNDS[scene.background]


def test_pixels_match_the_caption() -> None:
    """Background colour in the corners and each object's colour at its centre (large objects)."""
    size = 64
    checked = 0
    for seed in range(300):
        scene = shapes.scene_for_seed(seed)
        image = shapes.render(scene, size)
        parsed = shapes.parse_caption(scene.caption())
        assert parsed.background == scene.background
        assert [(o.shape, o.colour, o.size, o.position) for o in parsed.objects] == [
            (o.shape, o.colour, o.size, o.position) for o in scene.objects
        ]
        assert tuple(image[0, 0]) == shapes.BACKGROUNDS[scene.background]
        for obj in scene.objects:
            x = int(({"left": 0.2, "center": 0.5, "right": 0.8}[obj.position] + obj.dx) * size)
            y = int(obj.cy * size + (0.1 * size if obj.shape == "triangle" else 0))
            if obj.size == "large":
                assert np.abs(image[y, x].astype(int) - shapes.COLOURS[obj.colour]).max() <= 2, (
                    scene.caption()
                )
                checked += 1
    assert checked > 100


def test_caption_grammar_and_vocabulary() -> None:
    scene = shapes.Scene(
        background="gray",
        objects=(
            shapes.ShapeObject("circle", "red", "small", "left"),
            shapes.ShapeObject("square", "blue", "large", "right"),
        ),
    )
    assert scene.caption() == (
        "a small red circle on the left and a large blue square on the right , on a gray background"
    )
    vocabulary = set(shapes.vocabulary())
    for seed in range(500):
        words = shapes.scene_for_seed(seed).caption().split()
        assert set(words) <= vocabulary
    with pytest.raises(ValueError):
        shapes.parse_caption("a photo of a cat")


def test_objects_sorted_left_to_right_one_per_slot() -> None:
    for seed in range(300):
        positions = [obj.position for obj in shapes.scene_for_seed(seed).objects]
        assert positions == sorted(positions, key=shapes.POSITIONS.index)
        assert len(set(positions)) == len(positions)


def test_heldout_split_is_disjoint() -> None:
    assert shapes.split_seed(5, "heldout") != shapes.split_seed(5, "train")
    assert shapes.split_seed(5, "heldout") >= shapes.HELDOUT_OFFSET
    with pytest.raises(ValueError):
        shapes.split_seed(shapes.HELDOUT_OFFSET, "train")


def test_labels_layout() -> None:
    scene = shapes.Scene("white", (shapes.ShapeObject("triangle", "orange", "large", "center"),))
    labels = shapes.scene_labels(scene)
    assert labels["background"] == list(shapes.BACKGROUNDS).index("white")
    assert labels["shape"].tolist() == [0, 1 + shapes.SHAPES.index("triangle"), 0]
    assert labels["colour"].tolist() == [-1, list(shapes.COLOURS).index("orange"), -1]
    assert labels["size"].tolist() == [-1, 1, -1]


def test_torch_dataset() -> None:
    dataset = shapes.ShapesDataset(length=10, size=32, split="heldout")
    image, caption = dataset[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    again, caption_again = shapes.ShapesDataset(length=10, size=32, split="heldout")[3]
    assert torch.equal(image, again) and caption == caption_again
    assert not torch.equal(image, shapes.ShapesDataset(length=10, size=32, split="train")[3][0])
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    images, captions = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and len(captions) == 4
    with pytest.raises(IndexError):
        dataset[10]
    round_trip = shapes.to_uint8(image)
    assert np.array_equal(round_trip, shapes.render_seed(shapes.split_seed(3, "heldout"))[0])


def test_unknown_words_are_named_once_in_order_and_captions_have_none() -> None:
    assert shapes.unknown_words("A cat, a CAT and 2 sofas on a mat") == ["cat", "sofas", "mat"]
    for seed in range(20):
        assert shapes.unknown_words(shapes.scene_for_seed(seed).caption()) == []
    assert shapes.vocabulary_warning("a large red circle in the center, on a white background") is None
    warning = shapes.vocabulary_warning("a cat on a sofa")
    assert warning is not None and "\n" not in warning
    assert "'cat', 'sofa'" in warning and "backgrounds (black/white/gray/brown)" in warning
