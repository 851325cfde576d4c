"""Image transforms of the paper: random resized crop + flip for training, resize + centre crop
for evaluation, both normalised with the ImageNet mean/std (torchvision.transforms v1)."""

from __future__ import annotations

from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(image_size: int, crop_scale_min: float = 0.08) -> transforms.Compose:
    """PIL RGB image -> float32 tensor (3, image_size, image_size), randomly cropped and flipped.

    ``crop_scale_min`` is the smallest crop area fraction (torchvision's default 0.08).
    """
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(image_size: int, resize_size: int) -> transforms.Compose:
    """PIL RGB image -> float32 tensor (3, image_size, image_size): shorter side resized to
    ``resize_size``, then the centre ``image_size`` square cropped."""
    return transforms.Compose(
        [
            transforms.Resize(resize_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
