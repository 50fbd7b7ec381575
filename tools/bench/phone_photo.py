"""Writes the benchmark's 12-megapixel photo: scikit-image's astronaut (public domain, NASA) enlarged
to a phone camera's 4000x3000 and saved as a JPEG of quality 90. Her head reaches the top border,
so the crop needs the recipe's reflect padding: the costliest path of the alignment.

    tools/reference/.venv/bin/python tools/bench/phone_photo.py /tmp/phone_12mp.jpg
    stableid bench --only align --photo /tmp/phone_12mp.jpg
"""
import sys

from PIL import Image
from skimage import data

Image.fromarray(data.astronaut()).resize((4000, 3000), Image.LANCZOS).save(sys.argv[1], quality=90)
