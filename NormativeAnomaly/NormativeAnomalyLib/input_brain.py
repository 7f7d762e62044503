"""The input's own brain: is the scan skull-stripped, and if so the brain it keeps.

A skull-stripped scan (BraTS, most research pipelines) is registered to the template's brain
alone and scored within its own brain: the template's mask mapped onto it would cut the brain's
edge or reach past it, and both light up as anomalies.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

# Measured (docs/alignment.md): skull-stripped BraTS scans keep 1.38-1.73 L, heads with skull and
# scalp 2.9 L (a 2 x 2 x 3 mm head cut at the neck) to 8 L (templates with the neck). Adult
# intracranial volumes stay under 2 L.
MAX_STRIPPED_ML = 2300.0
# Skull stripping sets everything outside the brain to one value (usually 0); a head scan's air
# is noise, and a template's zero padding surrounds the whole head, not just the brain.
MIN_BACKGROUND_FRACTION = 0.3


def foreground(image: sitk.Image) -> np.ndarray:
    """Voxels above the image's lowest value: its largest connected part with holes filled, (z, y, x)."""
    values = sitk.GetArrayViewFromImage(image)
    above = values > values.min()
    labels, count = ndimage.label(above)
    if count == 0:
        return above
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(sizes.argmax()))


def is_skull_stripped(image: sitk.Image) -> bool:
    """Whether the scan holds a brain alone: a constant background around a brain-sized region."""
    values = sitk.GetArrayViewFromImage(image)
    background = float(np.mean(values == values.min()))
    if background < MIN_BACKGROUND_FRACTION:
        return False
    kept_ml = float(foreground(image).sum() * np.prod(image.GetSpacing()) / 1000.0)
    return kept_ml <= MAX_STRIPPED_ML


def stripped_brain_mask(image: sitk.Image) -> sitk.Image:
    """The brain a skull-stripped scan keeps, as a mask on its grid (what stripping left, holes
    such as a necrotic tumour core filled)."""
    mask = sitk.GetImageFromArray(foreground(image).astype(np.uint8))
    mask.CopyInformation(image)
    return mask
