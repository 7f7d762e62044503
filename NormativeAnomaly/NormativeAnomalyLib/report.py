"""report.png: input, pseudo-healthy reconstruction, anomaly overlay and segmentation on a few axial slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _axial(image: sitk.Image) -> np.ndarray:
    # Reorient to LPS so array rows run anterior->posterior and columns right->left
    # (radiological convention), whatever the acquisition orientation.
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def _pick_slices(labels: np.ndarray, brain: np.ndarray, count: int) -> list[int]:
    if labels.any():
        per_slice = labels.reshape(labels.shape[0], -1).sum(axis=1)
        best = [int(i) for i in np.argsort(-per_slice)[:count] if per_slice[i] > 0]
        if best:
            return sorted(best)
    inside = np.flatnonzero(brain.reshape(brain.shape[0], -1).any(axis=1))
    if inside.size == 0:
        inside = np.arange(brain.shape[0])
    return [int(i) for i in np.quantile(inside, np.linspace(0.3, 0.7, count)).round()]


def write_report(path: Path, result, count: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segmentation_image = sitk.GetImageFromArray(result.segmentation.mask.astype(np.uint8))
    segmentation_image.CopyInformation(result.input_image)
    image, healthy, scores, brain, mask = (
        _axial(x) for x in (result.input_image, result.pseudo_healthy, result.anomaly_map, result.brain_mask,
                            segmentation_image)
    )
    spacing = sitk.DICOMOrient(result.input_image, "LPS").GetSpacing()
    aspect = spacing[1] / spacing[0]
    brain_values = image[brain > 0] if brain.any() else image.ravel()
    low, high = np.percentile(brain_values, [0.5, 99.5])
    slices = _pick_slices(mask, brain, count)
    threshold = result.segmentation.threshold
    vmax = max(float(np.percentile(scores[brain > 0], 99.9)) if brain.any() else 1.0, threshold * 1.5, 1e-6)

    figure, axes = plt.subplots(len(slices), 4, figsize=(12, 3.1 * len(slices)), squeeze=False)
    titles = ("input", "pseudo-healthy", "anomaly map", "segmentation")
    for row, k in enumerate(slices):
        for col in range(4):
            ax = axes[row, col]
            ax.imshow(healthy[k] if col == 1 else image[k], cmap="gray", vmin=low, vmax=high, aspect=aspect)
            if col == 2:
                shown = np.ma.masked_less_equal(scores[k], 0)
                overlay = ax.imshow(shown, cmap="inferno", vmin=0, vmax=vmax, alpha=0.75, aspect=aspect)
            if col == 3 and mask[k].any():
                ax.contour(mask[k], levels=[0.5], colors="yellow", linewidths=1.2)
                ax.imshow(np.ma.masked_equal(mask[k], 0), cmap="autumn", alpha=0.45, aspect=aspect)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col])
        axes[row, 0].set_ylabel(f"axial slice {k}")
        figure.colorbar(overlay, ax=axes[row, 2], fraction=0.046, pad=0.02)
    card = result.model.card
    figure.suptitle(
        f"{card['name']} ({card['family']}, {card['modality']}): threshold {threshold:.4g} = "
        f"{100 * result.threshold_fpr:.3g}% healthy false-positive rate, min lesion "
        f"{result.segmentation.min_lesion_mm3:g} mm³, {len(result.segmentation.lesions)} lesion(s), "
        f"{sum(l.volume_ml for l in result.segmentation.lesions):.2f} mL.  Not for diagnosis.",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
