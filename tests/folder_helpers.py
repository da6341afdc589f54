"""Image files for the ImageFolder tests (tests/test_folder.py, tests/test_folder_cache.py)."""

import numpy as np
from PIL import Image


def img(path, size=(20, 16), mode="RGB", value=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode == "P":
        im = im.quantize(16)
    elif mode != "RGB":
        im = im.convert(mode)
    im.save(path, format=fmt)
    return path


def flat(root, classes=("cat", "dog", "eel"), per_class=10, size=(20, 16)):
    for k, c in enumerate(classes):  # distinct seeds: every image differs (hash() of a str varies per process)
        for i in range(per_class):
            img(root / c / f"{i:03d}.png", size=size, value=k * per_class + i)
    return root
